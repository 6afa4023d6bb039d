"""What a training run shows and writes for people: console lines (`say`), TensorBoard and
metrics.jsonl (`Reporter`), `config.txt`. Evaluation's result files are run/results.py's.
Process 0 writes; every file is written whole (`flt_jax.files`)."""

from __future__ import annotations

import math
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from flt_jax.files import write_atomic
from flt_jax.model import loop_count
from flt_jax.train import metrics as metrics_lib
from flt_jax.train import optimizer as optim_lib

# How far above ln(vocab) (a uniform guess) a train loss must be to call a run diverged.
DIVERGENCE_MARGIN_NATS = 1.0


def say(msg: str) -> None:
  """A console line, from process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class Reporter:
  """Train and eval lines for the console, TensorBoard and metrics.jsonl (sync steps)."""

  def __init__(self, run_setup, workdir: str, start: int):
    config, self._model_cfg = run_setup.config, run_setup.model_cfg
    self._optim_config = config.optim
    self._total_steps, self._tokens_per_step = run_setup.total_steps, run_setup.tokens_per_step
    device = run_setup.mesh.devices.flat[0]
    self._peak = metrics_lib.peak_flops_per_device(
      device.platform,
      device.device_kind,
      config.metrics.peak_flops_per_device,
      local_devices=jax.local_device_count(),
    )
    self._devices = run_setup.mesh.devices.size
    self._flops_per_token = metrics_lib.flops_per_token(self._model_cfg)
    self._seed = config.train.seed  # the loop-count draws' (model/loop_count.py)
    self._writer = metrics_lib.MetricsWriter(
      workdir, config.metrics.tensorboard, jsonl=True, warn=say
    )
    self._console = metrics_lib.ConsoleLogger(self._total_steps, print_fn=say)
    self._start = start
    self._t_last, self._step_last = time.time(), start
    self.first_loss = self.last_loss = None
    self.eval_metrics: dict = {}
    # A loss above a uniform guess over the vocabulary (plus a margin) means the run has
    # diverged: warned once, and named in the summary.
    self._diverged_above = math.log(self._model_cfg.vocab_size) + DIVERGENCE_MARGIN_NATS
    self.diverged_step: int | None = None
    self.skipped_total = 0
    cfg, n = self._model_cfg, run_setup.n_params
    say(
      f"{config.experiment or cfg.variant}: {cfg.variant} {loop_count.describe(cfg)} L={cfg.n_layer} "
      f"d={cfg.d_model} vocab={cfg.vocab_size} | {n['total']:,} params "
      f"({n['non_embedding']:,} non-embedding) | {self._total_steps} steps x "
      f"{self._tokens_per_step:,} tokens ({run_setup.num_micro} micro-batches)"
    )

  def train(self, step: int, metrics, skipped_total: int) -> None:
    now = time.time()
    tok_s = (step - self._step_last) * self._tokens_per_step / max(now - self._t_last, 1e-9)
    flops_per_token, extra, drawn = self._flops_per_token, None, {}
    if "loops" in metrics:  # drawn per step: FLOPs of the counts drawn since the last line
      counts = loop_count.draws_on_host(self._model_cfg, self._seed, range(self._step_last, step))
      flops_per_token = float(
        np.mean([metrics_lib.flops_per_token(self._model_cfg, int(n)) for n in counts])
      )
      extra = {"loops": int(metrics["loops"])}
      drawn = {"train/loops_mean": float(np.mean(counts))}
    self._t_last, self._step_last = now, step
    mfu = metrics_lib.compute_mfu(tok_s, flops_per_token, self._devices, self._peak)
    self.last_loss = float(metrics["loss"])
    self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
    self.skipped_total = skipped_total
    if self.diverged_step is None and not self.last_loss <= self._diverged_above:
      self.diverged_step = step
      say(
        f"warning: step {step}: loss {self.last_loss:.4g} is above a uniform guess over the "
        f"vocabulary (ln {self._model_cfg.vocab_size} = "
        f"{self._diverged_above - DIVERGENCE_MARGIN_NATS:.2f}) by more than "
        f"{DIVERGENCE_MARGIN_NATS:g} nat: the run has diverged. Lower optim.matrix_lr / "
        "embedding_lr, set optim.grad_clip, or restart from an earlier checkpoint"
      )
    scalars = {
      **metrics_lib.step_scalars(metrics),
      **drawn,
      "perf/tokens_per_s": tok_s,
      "train/nonfinite_total": skipped_total,
      **optim_lib.current_learning_rates(
        self._optim_config, self._model_cfg.d_model, step, self._total_steps
      ),
    }
    if mfu is not None:
      scalars["perf/mfu"] = mfu
    self._writer.write_scalars(step, scalars)
    self._console.log(step, self.last_loss, tok_s, mfu, extra)

  def eval(self, step: int, eval_metrics: dict) -> None:
    self.eval_metrics = eval_metrics
    self._writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    shown = " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if k != "tokens")
    say(f"eval @ {step}: {shown}")

  def summary(self, step: int) -> dict:
    evals = {f"eval_{k}": v for k, v in self.eval_metrics.items()}
    extra = {k: v for k, v in evals.items() if k != "eval_tokens"}
    steps = step - self._start
    if self.skipped_total:
      extra["skipped (non-finite)"] = f"{self.skipped_total} of {step} updates"
    if self.diverged_step is not None:
      extra["DIVERGED"] = f"since step {self.diverged_step}"
    self._console.summary(
      step,
      self.last_loss if self.last_loss is not None else float("nan"),
      steps * self._tokens_per_step,
      extra=extra,
    )
    if steps and self.skipped_total > step // 2:
      say(
        f"warning: {self.skipped_total} of {step} updates were skipped as non-finite: the "
        "model barely trained. Lower the learning rates, set optim.grad_clip, or try "
        "model.dtype=float32"
      )
    return {
      "step": step,
      "first_loss": self.first_loss,
      "final_loss": self.last_loss,
      "diverged_step": self.diverged_step,
      "skipped_updates": self.skipped_total,
      **evals,
    }

  def close(self) -> None:
    self._writer.close()


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config as readable text: `<workdir>/config.txt` (rewritten at every
  start, so it shows the latest invocation) and TensorBoard's text tab."""
  if jax.process_index() != 0:
    return
  text = str(config)
  write_atomic(epath.Path(workdir) / "config.txt", text)
  if config.metrics.tensorboard:
    writer = metrics_lib.MetricsWriter(workdir, enabled=True)
    writer.write_text("config", "```\n" + text + "\n```")
    writer.close()
