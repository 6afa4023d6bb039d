"""The run layer: a run assembled from its config, then trained or evaluated.

  resolve_config(config)          every key present and every section valid, before
                                  anything is written
  setup(config, workdir, ...)     the one assembly that training and checkpoint
                                  evaluation share (RunSetup)
  train_and_evaluate(config, workdir)
  evaluate_checkpoint(config, workdir, loops_list)

The train loop keeps the step count on the host and reads device values only on sync
steps (log, eval and checkpoint steps, preemption and the last step), so dispatch runs
ahead of the device in between; see `train_and_evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from flt_jax import config as flt_config
from flt_jax.constants import IGNORE_LABEL
from flt_jax.data import config as data_config_lib
from flt_jax.data import pipeline as data_pipeline
from flt_jax.data.tokenizers import Tokenizer
from flt_jax.errors import config_error
from flt_jax.eval import evaluate as eval_lib
from flt_jax.eval import step as eval_step_lib
from flt_jax.eval import sweep_report
from flt_jax.model import config as model_config_lib
from flt_jax.model.looped import LoopedTransformer
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import multihost
from flt_jax.parallel import sharding as sharding_lib
from flt_jax.train import config as train_config_lib
from flt_jax.train import metrics as metrics_lib
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train import step as step_lib
from flt_jax.train.checkpoint import (
  Checkpointer,
  CheckpointSaveError,
  PreemptionHandler,
  read_saved_config,
)
from flt_jax.workdir_lock import WorkdirLock


class NonFiniteError(RuntimeError):
  """train.max_consecutive_nonfinite updates in a row had a non-finite loss or gradient."""


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every key checked and every section validated.

  Raises ConfigError (a ValueError) naming the field and the fix; nothing is written
  before this passes.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  flt_config.check_keys(config)
  model_config_lib.validate(config.model)
  data_config_lib.validate(config.data, seq_len=config.model.seq_len)
  train_config_lib.validate(config)
  parallel_config.validate(config.mesh)
  return config


def _check_hosts(config) -> None:
  """Every host gets the same share of a micro-batch (so of a whole batch too)."""
  hosts = jax.process_count()
  if config.train.micro_batch_size % hosts:
    raise config_error(
      "train.micro_batch_size",
      config.train.micro_batch_size,
      f"its sequences do not divide over the {hosts} hosts",
      "make it a multiple of the host count",
    )


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """Everything a run is made of, built once by `setup`."""

  config: ml_collections.ConfigDict  # resolved; model.vocab_size is the model's
  model_cfg: model_config_lib.ModelConfig
  model: LoopedTransformer
  optimizer: optax.GradientTransformation
  # The train state as ShapeDtypeStructs; params keep their Flax nn.Partitioned boxes
  # (logical axis names) so shardings can be derived with nn.logical_to_mesh_sharding.
  abstract_state_boxed: state_lib.TrainState
  mesh: jax.sharding.Mesh  # axes (data, fsdp, tensor) over every device of every process
  rules: tuple  # logical axis name -> mesh axes (config.mesh.rules)
  state_shardings: state_lib.TrainState  # a NamedSharding per leaf of the unboxed state
  batch_sharding: jax.sharding.NamedSharding  # [B, T] batches: B over data x fsdp
  checkpointer: Checkpointer
  tokenizer: Tokenizer
  token_bytes_V: np.ndarray  # int32 [V]: UTF-8 bytes of each token, for bits per byte
  train_pipeline: data_pipeline.Pipeline | None  # None when only evaluating
  num_micro: int  # micro-batches per optimizer step
  total_steps: int
  n_params: dict[str, int]

  @property
  def abstract_state(self) -> state_lib.TrainState:
    """The abstract state without boxes: the structure of the real one (restore target)."""
    return nn.meta.unbox(self.abstract_state_boxed)

  @property
  def tokens_per_step(self) -> int:
    return self.config.train.micro_batch_size * self.num_micro * self.model_cfg.seq_len

  @property
  def rng(self) -> jax.Array:
    return jax.random.PRNGKey(self.config.train.seed)

  @property
  def restore_target(self) -> state_lib.TrainState:
    """The abstract state carrying this mesh's shardings: Orbax restores onto it, so a
    checkpoint written on another mesh (8 devices) lands sharded on this one (4, 1)."""
    return sharding_lib.with_shardings(self.abstract_state_boxed, self.state_shardings)

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, born sharded (jit with out_shardings: no full copy on one device)."""
    model, optimizer, seq_len = self.model, self.optimizer, self.model_cfg.seq_len
    return sharding_lib.create_sharded(
      lambda rng: state_lib.create_train_state(model, optimizer, rng, seq_len),
      self.mesh,
      self.rules,
      self.state_shardings,
      self.rng,
    )

  def global_batch(self, host_batch: dict, keys, rows: int) -> dict:
    """Global arrays of `rows` sequences from this host's share of them (its
    process_index-th slice), split over the batch's mesh axes."""
    return sharding_lib.make_global_batch(
      {k: host_batch[k] for k in keys if k in host_batch}, self.batch_sharding, rows
    )

  def make_eval_fn(self):
    """eval_fn(params, host_batch, token_bytes_V, *, loops) -> sums, sharded like the
    train step; each loop count compiles once."""
    compiled = {}
    keys = eval_step_lib.batch_keys(self.model_cfg)
    rows = self.config.train.micro_batch_size

    def eval_fn(params, host_batch, token_bytes_V, *, loops: int):
      if loops not in compiled:
        compiled[loops] = sharding_lib.jit_eval_step(
          functools.partial(eval_step_lib.eval_step, model=self.model, loops=loops),
          self.mesh,
          self.rules,
          self.state_shardings.params,
          self.batch_sharding,
        )
      return compiled[loops](params, self.global_batch(host_batch, keys, rows), token_bytes_V)

    return eval_fn

  def describe_devices(self) -> str:
    """The startup line: devices, processes, mesh, per-device batch, parameters, and the
    attention kernel chosen for the devices' platform."""
    shards = sharding_lib.batch_shards(self.mesh, self.rules)
    micro = self.config.train.micro_batch_size
    return (
      f"devices: {mesh_lib.describe(self.mesh)} in {jax.process_count()} process(es) | "
      f"per-device batch {micro // shards} sequence(s) x {self.num_micro} micro-batch(es) "
      f"of {self.model_cfg.seq_len} tokens | {self.n_params['total']:,} params | "
      f"{self.model_cfg.describe_attention()}"
    )

  def eval_batches(self, data_config=None) -> data_pipeline.Pipeline:
    """A fresh pass over this host's validation batches (of `data_config`, default
    config.data). A fixed batch count keeps every host in step (padding batches carry no
    targets)."""
    return data_pipeline.make_pipeline(
      self.config.data if data_config is None else data_config,
      split="validation",
      seq_len=self.model_cfg.seq_len,
      batch_size=self.config.train.micro_batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_epochs=1,
      num_batches=self.config.train.eval_steps,
      tokenizer=self.tokenizer,
    )


def setup(config: ml_collections.ConfigDict, workdir: str, *, training: bool) -> RunSetup:
  """Resolves the config, then builds tokenizer, model, optimizer, abstract state,
  checkpointer and (when `training`) the train pipeline.

  The vocabulary comes from the tokenizer when `config.model.vocab_size` is 0; the
  resolved size is written into the returned config, which is saved with every
  checkpoint, so a workdir trained with another vocabulary is refused.
  """
  config = resolve_config(config)
  # Before anything touches a JAX backend: on a pod every host joins the cluster here.
  multihost.initialize(config.mesh)
  multihost.check_workdir(workdir, jax.process_count(), config.mesh.shared_filesystem)
  _check_hosts(config)
  tokenizer = data_pipeline.make_tokenizer(config.data)
  model_cfg = model_config_lib.ModelConfig.from_config(config.model, tokenizer.vocab_size)
  config.model.vocab_size = model_cfg.vocab_size
  model_cfg = model_cfg.for_devices(jax.devices())  # the mesh's devices pick the kernels
  num_micro = train_config_lib.grad_accum_steps(config)
  global_batch = config.train.micro_batch_size * num_micro
  model = LoopedTransformer(model_cfg)
  rng = jax.random.PRNGKey(config.train.seed)
  boxed_params = state_lib.abstract_params(model, rng, model_cfg.seq_len)
  n_params = state_lib.count_params(nn.meta.unbox(boxed_params))
  total_steps = optim_lib.resolve_total_steps(
    config.train, n_params["total"], global_batch * model_cfg.seq_len
  )
  optimizer = optim_lib.make_optimizer(
    config.optim, d_model=model_cfg.d_model, total_steps=total_steps
  )
  abstract_state_boxed = state_lib.abstract_train_state(boxed_params, optimizer)
  # Mesh, rules and shardings: every mismatch (sizes, indivisible batch or dimension)
  # is a ConfigError here, before the workdir is touched.
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.mesh)
  sharding_lib.check_batch(global_batch, config.train.micro_batch_size, mesh, rules)
  state_shardings = sharding_lib.state_shardings(abstract_state_boxed, mesh, rules)
  train_pipeline = None
  if training:  # before the checkpointer: a data error leaves the workdir untouched
    train_pipeline = data_pipeline.make_pipeline(
      config.data,
      split="train",
      seq_len=model_cfg.seq_len,
      batch_size=global_batch // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      tokenizer=tokenizer,
    )
  if training and config.train.eval_every:
    _check_validation_data(config, model_cfg.seq_len, tokenizer)
  # Refuses an unwritable workdir, or one whose saved model shape differs.
  checkpointer = Checkpointer.from_config(workdir, config, tokenizer=tokenizer.identity())
  return RunSetup(
    config=config,
    model_cfg=model_cfg,
    model=model,
    optimizer=optimizer,
    abstract_state_boxed=abstract_state_boxed,
    mesh=mesh,
    rules=rules,
    state_shardings=state_shardings,
    batch_sharding=sharding_lib.batch_sharding(mesh, rules),
    checkpointer=checkpointer,
    tokenizer=tokenizer,
    token_bytes_V=np.asarray(tokenizer.token_bytes, np.int32),
    train_pipeline=train_pipeline,
    num_micro=num_micro,
    total_steps=total_steps,
    n_params=n_params,
  )


def _check_validation_data(config, seq_len: int, tokenizer: Tokenizer) -> None:
  """The first eval must not be where an empty validation split shows: build this
  host's validation pipeline (in-process) and read its first batch, before anything is
  written. ConfigError naming the fields and the fix otherwise."""
  d = config.data
  every = config.train.eval_every
  if d.source not in data_config_lib.SYNTHETIC_SOURCES and float(d.validation_fraction) == 0:
    raise config_error(
      "data.validation_fraction",
      d.validation_fraction,
      f"it leaves no validation data, but train.eval_every={every} evaluates on it",
      "set data.validation_fraction > 0 (e.g. 0.05), or train.eval_every=0 to train "
      "without evaluation",
    )
  if d.source in data_config_lib.SYNTHETIC_SOURCES and int(d.num_validation_examples) < 1:
    raise config_error(
      "data.num_validation_examples",
      d.num_validation_examples,
      f"it leaves no validation data, but train.eval_every={every} evaluates on it",
      "set it >= 1, or train.eval_every=0 to train without evaluation",
    )
  probe = ml_collections.ConfigDict(d.to_dict())
  probe.num_workers = 0  # a look at one batch needs no worker processes
  pipeline = data_pipeline.make_pipeline(
    probe,
    split="validation",
    seq_len=seq_len,
    batch_size=max(1, config.train.micro_batch_size // jax.process_count()),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_epochs=1,
    tokenizer=tokenizer,
  )
  first = next(iter(pipeline), None)
  if first is None or not np.any(first["targets"] != IGNORE_LABEL):
    raise config_error(
      "data.path" if d.path else "data.source",
      d.path or d.source,
      f"its validation split ({pipeline.description}) holds no tokens to evaluate on",
      "raise data.validation_fraction, point data.path at files with text in "
      f"data.text_column={d.text_column!r}, or set train.eval_every=0",
    )


def compile_train_step(run_setup: RunSetup, diagnostics: bool):
  """`train_step` for this run over its mesh: (state, global batch) -> (state, metrics),
  the state sharded as `state_shardings` and donated, the batch split over data x fsdp,
  the metrics replicated. `diagnostics` adds per-loop losses and per-layer gradient
  norms."""
  return sharding_lib.jit_train_step(
    functools.partial(
      step_lib.train_step,
      model=run_setup.model,
      optimizer=run_setup.optimizer,
      num_micro=run_setup.num_micro,
      diagnostics=diagnostics,
      max_consecutive_nonfinite=run_setup.config.train.max_consecutive_nonfinite,
    ),
    run_setup.mesh,
    run_setup.rules,
    run_setup.state_shardings,
    run_setup.batch_sharding,
    num_micro=run_setup.num_micro,
  )


def fetch(tree):
  """The loop's one way of reading device values (on sync steps only)."""
  return jax.device_get(tree)


class _Reporter:
  """Train and eval lines for the console, TensorBoard and metrics.jsonl (sync steps)."""

  def __init__(self, run_setup: RunSetup, workdir: str, start: int):
    config, self._model_cfg = run_setup.config, run_setup.model_cfg
    self._optim_config = config.optim
    self._total_steps, self._tokens_per_step = run_setup.total_steps, run_setup.tokens_per_step
    device = jax.devices()[0]
    self._peak = metrics_lib.peak_flops_per_device(
      device.platform,
      device.device_kind,
      config.metrics.peak_flops_per_device,
      local_devices=jax.local_device_count(),
    )
    self._flops_per_token = metrics_lib.flops_per_token(self._model_cfg)
    self._writer = metrics_lib.MetricsWriter(workdir, config.metrics.tensorboard, jsonl=True)
    self._console = metrics_lib.ConsoleLogger(self._total_steps, print_fn=_say)
    self._start = start
    self._t_last, self._step_last = time.time(), start
    self.first_loss = self.last_loss = None
    self.eval_metrics: dict = {}
    cfg, n = self._model_cfg, run_setup.n_params
    _say(
      f"{config.experiment or cfg.variant}: {cfg.variant} K={cfg.loops} L={cfg.n_layer} "
      f"d={cfg.d_model} vocab={cfg.vocab_size} | {n['total']:,} params "
      f"({n['non_embedding']:,} non-embedding) | {self._total_steps} steps x "
      f"{self._tokens_per_step:,} tokens ({run_setup.num_micro} micro-batches)"
    )

  def train(self, step: int, metrics, skipped_total: int) -> None:
    now = time.time()
    tok_s = (step - self._step_last) * self._tokens_per_step / max(now - self._t_last, 1e-9)
    self._t_last, self._step_last = now, step
    mfu = metrics_lib.compute_mfu(tok_s, self._flops_per_token, jax.device_count(), self._peak)
    self.last_loss = float(metrics["loss"])
    self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
    scalars = {
      **metrics_lib.step_scalars(metrics),
      "perf/tokens_per_s": tok_s,
      "train/nonfinite_total": skipped_total,
      **optim_lib.current_learning_rates(
        self._optim_config, self._model_cfg.d_model, step, self._total_steps
      ),
    }
    if mfu is not None:
      scalars["perf/mfu"] = mfu
    self._writer.write_scalars(step, scalars)
    self._console.log(step, self.last_loss, tok_s, mfu)

  def eval(self, step: int, eval_metrics: dict) -> None:
    self.eval_metrics = eval_metrics
    self._writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    shown = " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if k != "tokens")
    _say(f"eval @ {step}: {shown}")

  def summary(self, step: int) -> dict:
    evals = {f"eval_{k}": v for k, v in self.eval_metrics.items()}
    self._console.summary(
      step,
      self.last_loss if self.last_loss is not None else float("nan"),
      (step - self._start) * self._tokens_per_step,
      extra={k: v for k, v in evals.items() if k != "eval_tokens"},
    )
    return {"step": step, "first_loss": self.first_loss, "final_loss": self.last_loss, **evals}

  def close(self) -> None:
    self._writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final metrics.

  Steps are counted on the host: step n is the n-th batch, whether its update was
  applied or skipped as non-finite (state.step + state.nonfinite_total). Device values
  (loss, counters) are read only on sync steps: log steps, eval steps, checkpoint steps
  (Orbax's interval and the last step) and a preemption. The stop rule stays exact:
  once `train.max_consecutive_nonfinite` updates in a row were skipped, the train step
  leaves the state unchanged, so the next sync finds the step that tripped it and the
  run stops there without saving.
  """
  run_setup = setup(config, workdir, training=True)
  # One run per workdir (process 0 holds it); a stale lock from a killed run is taken over.
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0).acquire()
  try:
    return _train(run_setup, workdir)
  finally:
    lock.release()


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config as readable text: `<workdir>/config.txt` (rewritten at every
  start, so it shows the latest invocation) and TensorBoard's text tab."""
  if jax.process_index() != 0:
    return
  text = str(config)
  (epath.Path(workdir) / "config.txt").write_text(text)
  if config.metrics.tensorboard:
    writer = metrics_lib.MetricsWriter(workdir, enabled=True)
    writer.write_text("config", "```\n" + text + "\n```")
    writer.close()


def _warn_if_schedule_changed(run_setup: RunSetup, saved: dict | None, step: int) -> None:
  """Resuming with another train.steps recomputes the constant-then-warm-down schedule
  for the new length; say what the learning rate does at the resumed step."""
  old_steps = int(((saved or {}).get("train") or {}).get("steps", 0) or 0)
  new_steps = run_setup.total_steps
  if old_steps < 1 or old_steps == new_steps:
    return
  optim = run_setup.config.optim

  def multiplier(total):
    return optim_lib.lr_multiplier(step, total, optim.warmup_steps, optim.warmdown_frac)

  _say(
    f"warning: train.steps changed from {old_steps} to {new_steps} on resume; the "
    f"learning-rate schedule is recomputed for {new_steps} steps, so at step {step} its "
    f"multiplier goes from {multiplier(old_steps):.3f} (old schedule) to "
    f"{multiplier(new_steps):.3f} and follows the new schedule (warm-down to 0 over the "
    f"last {optim.warmdown_frac:.0%} of {new_steps} steps)"
  )


def _check_data_stream(run_setup: RunSetup, saved: dict | None, step_dir) -> None:
  """The saved data-iterator state resumes only the pipeline that wrote it: a changed
  data setting (data.num_workers, shuffle, shuffle_window_rows, the corpus, ...) is
  refused here, naming it, instead of failing inside grain's set_state."""
  changes = data_config_lib.stream_changes(((saved or {}).get("data")), run_setup.config.data)
  if not changes:
    return
  field, before, now = changes[0]
  others = "".join(f", {f} (saved {b!r}, now {n!r})" for f, b, n in changes[1:])
  flags = " ".join(f"--config.{f}={b}" for f, b, _ in changes)
  raise config_error(
    field,
    now,
    f"the checkpoint {step_dir} saved the data stream's position for {field}={before!r}"
    f"{' (also changed: ' + others[2:] + ')' if others else ''}, and that position does "
    "not carry over to another data pipeline",
    f"resume with the saved value(s) ({flags}), or add --config.checkpoint.restore_data=False "
    "to keep the trained state and start the new data stream from its beginning, or use a "
    "new --workdir",
  )


def _check_save_all_hosts(checkpointer: Checkpointer) -> None:
  """Multi-host: every host looks at its last save at the same sync step, and all stop
  together if any host's failed."""
  error = None
  try:
    checkpointer.check_save()
  except CheckpointSaveError as e:
    error = e
  failed = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
  if error is not None:
    raise error
  if np.any(failed):
    hosts = [i for i, f in enumerate(np.asarray(failed).reshape(-1)) if f]
    raise CheckpointSaveError(
      f"Saving a checkpoint to {checkpointer.directory} failed on host(s) {hosts} (see "
      "their output); stopped. The checkpoints already saved are intact."
    )


def _profile_window(profile_steps: str) -> tuple[int, int] | None:
  if not profile_steps:
    return None
  start, stop = (int(s) for s in profile_steps.split(","))
  return start, stop


def _train(run_setup: RunSetup, workdir: str) -> dict:
  config, checkpointer = run_setup.config, run_setup.checkpointer
  total_steps, train = run_setup.total_steps, config.train
  train_iter = iter(run_setup.train_pipeline)
  latest = checkpointer.latest_step()
  _say(run_setup.describe_devices())
  # A disk that cannot hold one checkpoint stops the run now, not at its first save.
  checkpointer.check_space(run_setup.abstract_state)
  if latest is None:
    state = run_setup.init_state()
  else:
    saved = checkpointer.restore_config(latest)
    _warn_if_schedule_changed(run_setup, saved, latest)
    data_item = {}
    if config.checkpoint.restore_data:
      _check_data_stream(run_setup, saved, checkpointer.directory / str(latest))
      data_item = {"data": data_pipeline.checkpoint_args_restore(train_iter)}
    state = checkpointer.restore(latest, run_setup.restore_target, data_item)["state"]
    fresh = "" if data_item else " (data stream restarted: checkpoint.restore_data=False)"
    _say(f"resumed from {checkpointer.directory} at step {latest}{fresh}")
  _write_config(run_setup.config, workdir)
  counters = fetch({"applied": state.step, "skipped": state.nonfinite_total})
  start, skipped_seen = int(counters["applied"] + counters["skipped"]), int(counters["skipped"])

  train_step = compile_train_step(run_setup, diagnostics=False)
  train_step_diag = compile_train_step(run_setup, diagnostics=True)
  step_keys = step_lib.batch_keys(run_setup.model_cfg)
  batch_rows = config.train.micro_batch_size * run_setup.num_micro
  eval_fn = run_setup.make_eval_fn()
  report = _Reporter(run_setup, workdir, start)
  profile = _profile_window(train.profile_steps)
  profiling = False

  single_host = jax.process_count() == 1
  closed = False

  def close():
    nonlocal closed
    if closed:
      return
    closed = True
    if profiling:
      jax.profiler.stop_trace()
    try:
      checkpointer.close()
    finally:
      report.close()

  try:
    # Ctrl-C is treated like preemption: save the step reached, then exit.
    with PreemptionHandler(signals=(signal.SIGTERM, signal.SIGINT)) as preemption:
      step = start
      while step < total_steps:
        if profile and step == profile[0] and not profiling:
          jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
          profiling = True
        elif profiling and step == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
          _say(f"profile of steps {profile[0]}..{profile[1]} written to {workdir}/profile")
        batch = next(train_iter)
        log_now = step == start or (step + 1) % train.log_every == 0 or step + 1 == total_steps
        step_fn = train_step_diag if log_now else train_step
        state, metrics = step_fn(state, run_setup.global_batch(batch, step_keys, batch_rows))
        step += 1
        if single_host:  # host-only look: a failed background save stops the run here
          checkpointer.check_save()
        eval_now = bool(train.eval_every) and (step % train.eval_every == 0 or step == total_steps)
        save_now = step == total_steps or checkpointer.should_save(step)
        preempted = preemption.should_stop(step)
        if not (log_now or eval_now or save_now or preempted):
          continue  # nothing read from the device: the next step is dispatched at once

        # Sync step: one read of the counters (and of the metrics on log steps).
        counters, host_metrics = fetch(
          (
            {
              "applied": state.step,
              "in_a_row": state.nonfinite_in_a_row,
              "skipped": state.nonfinite_total,
            },
            metrics if log_now else None,
          )
        )
        if not single_host:  # every host stops at the same sync step
          _check_save_all_hosts(checkpointer)
        skipped = int(counters["skipped"])
        if skipped > skipped_seen:
          _say(
            f"step {step}: {skipped - skipped_seen} non-finite update(s) skipped since the last "
            f"report ({int(counters['in_a_row'])} in a row, {skipped} in all)"
          )
        skipped_seen = skipped
        if counters["in_a_row"] >= train.max_consecutive_nonfinite:
          close()
          raise NonFiniteError(
            f"{train.max_consecutive_nonfinite} consecutive non-finite updates at step "
            f"{int(counters['applied']) + skipped}; stopping. The last good checkpoint in "
            f"{checkpointer.directory} is intact. Lower optim.matrix_lr/embedding_lr, set "
            "optim.grad_clip, or try model.dtype=float32."
          )
        if log_now:
          report.train(step, host_metrics, skipped)
        if eval_now:
          batches = run_setup.eval_batches()
          loops = run_setup.model_cfg.loops
          report.eval(
            step,
            eval_lib.evaluate(eval_fn, state.params, batches, run_setup.token_bytes_V, loops=loops),
          )
        if save_now or preempted:
          # Orbax decides interval saves; the last step and a preemption are forced.
          data_item = {"data": data_pipeline.checkpoint_args_save(train_iter)}
          checkpointer.save(step, state, data_item, force=step == total_steps or preempted)
        if preempted:
          checkpointer.wait_until_finished()
          _say(
            f"stopped by a signal: saved step {step} to {checkpointer.directory}; rerun the "
            "same command to resume"
          )
          close()
          return {"step": step, "preempted": True}
    close()
    if step == start:
      _say(f"already at step {step} of {total_steps}; raise --config.train.steps to train on")
      return {"step": step, "first_loss": None, "final_loss": None}
    return report.summary(step)
  except BaseException:
    # Whatever stopped the loop: an in-flight save still completes (nothing saved is
    # lost) and the writers are closed; the original error is what the user sees.
    with contextlib.suppress(Exception):
      close()
    raise


def restore_params(
  workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> tuple[RunSetup, dict, int]:
  """(run setup, params, step) from a checkpoint of `workdir` (default: its latest),
  sharded over this run's mesh. With `config` None the config saved in that checkpoint
  is used, so a workdir alone is enough. Nothing is created in the workdir."""
  saved, step = read_saved_config(workdir, step)
  if config is None:
    config = flt_config.with_defaults(saved)
    # The mesh describes the machine it ran on, not the model: lay the saved run's state
    # over this machine's devices (all on fsdp, JAX's CPU device count), whatever mesh
    # wrote it.
    defaults = parallel_config.get_config()
    for field in (
      parallel_config.MESH_AXES + parallel_config.DCN_FIELDS + ("cpu_devices", "cpu_reuse_memory")
    ):
      config.mesh[field] = defaults[field]
  run_setup = setup(config, workdir, training=False)
  checkpointer = run_setup.checkpointer
  try:
    checkpointer.check_param_shapes(step, run_setup.abstract_state.params)
    params = checkpointer.restore(step, run_setup.restore_target)["state"].params
  finally:
    checkpointer.close()
  return run_setup, params, step


def _h_change_batch(run_setup: RunSetup):
  """Tokens and target mask of the first validation batch (global arrays)."""
  batch = next(iter(run_setup.eval_batches()))
  rows = run_setup.config.train.micro_batch_size
  batch = run_setup.global_batch(batch, ("inputs", "targets"), rows)
  return batch["inputs"], batch["targets"] != IGNORE_LABEL


HOP_METRIC = "answer_accuracy_hops"  # + hop count: the multihop sweep's per-hop accuracy


def hop_data_config(data_config, hops: int) -> ml_collections.ConfigDict:
  """config.data restricted to `hops` hops (hops_min = hops_max = hops), same task seed."""
  data = ml_collections.ConfigDict(data_config.to_dict())
  data.multihop.hops_min = data.multihop.hops_max = int(hops)
  return data


def _hop_sweep(run_setup: RunSetup, eval_fn, params, loops_list) -> dict[int, dict[str, float]]:
  """{K': {answer_accuracy_hops<h>: accuracy}} for every hop count h the run trained on,
  each on its own validation set (hop_data_config)."""
  m = run_setup.config.data.multihop
  out = {int(k): {} for k in loops_list}
  for hops in range(int(m.hops_min), int(m.hops_max) + 1):
    batches = functools.partial(
      run_setup.eval_batches, hop_data_config(run_setup.config.data, hops)
    )
    for k, metrics in eval_lib.loop_sweep(
      eval_fn, params, batches, run_setup.token_bytes_V, loops_list
    ).items():
      out[k][f"{HOP_METRIC}{hops}"] = metrics["answer_accuracy"]
  return out


def evaluate_checkpoint(
  config: ml_collections.ConfigDict | None,
  workdir: str,
  loops_list: list[int] | None = None,
  step: int | None = None,
) -> dict[int, dict]:
  """Restores a checkpoint of workdir (default: the latest; `config` None: the config
  saved with it) and evaluates it at each loop count (test-time compute: params trained
  at K run at any K' >= 1), with `h_change`, how much the last loop still moves h.

  Process 0 writes `<workdir>/eval_step<N>.json` (each K' added to what an earlier
  sweep of the same step wrote), `loop_sweep_step<N>.csv`/`.png`, and TensorBoard
  scalars under `tb/loop_sweep_step<N>` with K' as the x axis. On multihop data each
  trained hop count is also evaluated alone (`answer_accuracy_hops<h>`), written as the
  hops x K' table and heat map `hops_by_loops_step<N>.csv`/`.png`."""
  bad = [k for k in loops_list or [] if k < 1]
  if bad:
    raise config_error("--eval_loops", bad, "every loop count must be >= 1", "e.g. 1,2,4,12")
  saved, step = read_saved_config(workdir, step)
  trained_loops = int(saved.get("model", {}).get("loops", 0)) or None
  run_setup, params, step = restore_params(workdir, config, step)
  model_cfg = run_setup.model_cfg
  trained_loops = trained_loops or model_cfg.loops
  loops_list = sorted(set(loops_list or [trained_loops]))
  eval_fn = run_setup.make_eval_fn()
  results = eval_lib.loop_sweep(
    eval_fn, params, run_setup.eval_batches, run_setup.token_bytes_V, loops_list
  )
  if run_setup.config.data.source == "multihop":
    for k, per_hop in _hop_sweep(run_setup, eval_fn, params, loops_list).items():
      results[k].update(per_hop)
  tokens_BxT, mask_BxT = _h_change_batch(run_setup)
  for k, change in sweep_report.sweep_h_change(
    run_setup.model, params, tokens_BxT, loops_list, mask_BxT
  ).items():
    results[k]["h_change"] = change
  _say(f"checkpoint step {step} of {workdir} ({model_cfg.variant}, trained at K={trained_loops}):")
  for k, m in results.items():
    shown = " | ".join(f"{name} {v:.4f}" for name, v in m.items() if name != "tokens")
    _say(f"  loops {k:3d}: {shown}")
  if jax.process_index() == 0:
    _write_sweep(workdir, step, trained_loops, results, run_setup.config.metrics.tensorboard)
  return results


def _write_sweep(workdir: str, step: int, trained_loops: int, results: dict, tb: bool) -> None:
  table_path = epath.Path(workdir) / f"eval_step{step}.json"
  table = {"step": step, "trained_loops": trained_loops, "loops": {}}
  if table_path.exists():
    table["loops"] = json.loads(table_path.read_text()).get("loops", {})
  # JSON has no NaN (h_change at K'=1): non-finite values are written as null.
  table["loops"].update(
    {str(k): {n: (v if np.isfinite(v) else None) for n, v in m.items()} for k, m in results.items()}
  )
  table_path.write_text(json.dumps(table, indent=1))
  every_k = {
    int(k): {n: (np.nan if v is None else v) for n, v in m.items()}
    for k, m in table["loops"].items()
  }
  files = sweep_report.write_sweep_report(
    every_k, trained_loops, workdir, name=f"loop_sweep_step{step}", title=f"step {step}"
  )
  hop_accuracy = {}  # hops x K', from every K' swept at this step
  for k, metrics in every_k.items():
    for name, v in metrics.items():
      if name.startswith(HOP_METRIC):
        hop_accuracy.setdefault(int(name.removeprefix(HOP_METRIC)), {})[k] = v
  if hop_accuracy:
    hop_files = sweep_report.write_hop_report(
      hop_accuracy,
      trained_loops,
      workdir,
      name=f"hops_by_loops_step{step}",
      title=f"answer accuracy by hops, step {step}",
    )
    _say(f"wrote {hop_files['csv']} and {hop_files['png']}")
  writer = metrics_lib.MetricsWriter(workdir, enabled=tb, tb_subdir=f"tb/loop_sweep_step{step}")
  for k, metrics in sorted(results.items()):
    finite = {f"loop_sweep/{n}": v for n, v in metrics.items() if np.isfinite(v)}
    writer.write_scalars(k, finite)
  writer.close()
  _say(f"wrote {table_path}, {files['csv']} and {files['png']}")
