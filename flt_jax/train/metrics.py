"""Throughput accounting (FLOPs, MFU), TensorBoard scalars, console lines.

FLOPs per trained token (forward + backward, `flops_per_token`)::

    6 * N_blocks * K                      block matmuls, once per loop
  + 12 * L * H * hd * T * K               attention scores and mixing
  + 6 * D * Vpad * n_loss_loops           lm_head, for every loop with a loss

* N_blocks: parameters of the L shared blocks (attention projections + MLP).
  The embedding (a lookup) and lm_head are NOT in N_blocks; lm_head is counted
  by its own term, because it runs once per loop whose loss is computed, not
  K times. (The reference's 6*(N - N_embedding) counts lm_head once.)
* n_loss_loops: END -> 1, STEP -> K, FEW -> len(range(2K//3, K))
  (`ModelConfig.loss_loops`).
* Attention: 12*L*H*hd*T per loop, as the reference counts it: full T x T
  (the causal mask is NOT halved) and sliding windows are NOT discounted.
* Vpad: `ModelConfig.padded_vocab_size` (the lm_head matmul size).
* Norms, rotary, softcap, softmax and the loss itself are ignored.

Random loop counts and gradient windows (`model.loop_sampling`, `model.backprop_loops`;
model/windowed.py): a step of n loops with window k runs min(n, k) loops forward and
backward (the two terms above per loop) and n - min(n, k) forward only (a third of
them), and lm_head for `ModelConfig.trained_loss_loops(n)`. These are model FLOPs of the
loops the model ran: when n < k the window's empty slots still execute and are not
counted, nor is any rematerialisation. `flops_per_token(cfg, n)` is one count's figure;
without n, a random draw's expectation over `loop_count.probabilities`. The run's
progress lines use the mean over the logged steps' actual draws.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from flt_jax import files
from flt_jax.model import loop_count
from flt_jax.model.config import ModelConfig

# ----------------------------------------------------------------------------
# FLOPs.
# ----------------------------------------------------------------------------


def block_params_per_layer(cfg: ModelConfig) -> int:
  """Matmul parameters of one block (attention + MLP), no norms/biases."""
  d, h, hkv, r, hd = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.kv_lora_rank, cfg.head_dim
  q = d * h * hd
  proj = h * hd * d
  if r > 0:  # MLA: c_kv_down D->r, c_k_up and c_v_up r->Hkv*hd.
    kv = d * r + 2 * r * hkv * hd
  else:
    kv = 2 * d * hkv * hd
  mlp = 2 * d * 4 * d
  return q + kv + proj + mlp


def flops_per_token(cfg: ModelConfig, loops: int | None = None) -> float:
  """Training FLOPs per token of a step of `loops` loops (default: cfg.loops, or the
  expectation over a random draw); see the module docstring for the formula."""
  if loops is None and cfg.loop_sampling != "fixed":
    probs = loop_count.probabilities(cfg)
    return float(sum(p * flops_per_token(cfg, n) for n, p in enumerate(probs, 1) if p))
  k = cfg.loops if loops is None else loops
  with_grad = min(k, cfg.gradient_window) if cfg.windowed else k
  forward_only = k - with_grad
  n_blocks = cfg.n_layer * block_params_per_layer(cfg)
  per_loop = 6 * n_blocks + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.seq_len
  loss_loops = len(cfg.trained_loss_loops(k))
  return float(
    per_loop * with_grad
    + per_loop * forward_only / 3
    + 6 * cfg.d_model * cfg.padded_vocab_size * loss_loops
  )


# Peak dense bf16 FLOP/s per device (vendor datasheets; sparse figures are 2x).
_PEAK_FLOPS = (
  # (platform, substrings of device_kind (lowercase, any), flops)
  ("tpu", ("v6 lite", "v6e"), 918e12),  # Trillium.
  ("tpu", ("v5 lite", "v5e"), 197e12),
  ("tpu", ("v5p", "v5"), 459e12),
  ("tpu", ("v4",), 275e12),
  ("gpu", ("h200",), 989e12),  # SXM, dense.
  ("gpu", ("h100 pcie",), 756e12),
  ("gpu", ("h100",), 989e12),  # SXM, dense.
  ("gpu", ("a100",), 312e12),
)
# Nominal CPU figure so that MFU prints something on laptops/CI: per core, two
# 8-lane float32 FMA units at 2.5 GHz (AVX2), 80 GFLOP/s. An estimate, not a
# measurement of any particular CPU; set metrics.peak_flops_per_device to override.
CPU_NOMINAL_PEAK_FLOPS_PER_CORE = 2 * 8 * 2 * 2.5e9
CPU_NOMINAL_PEAK_FLOPS = CPU_NOMINAL_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1)


def peak_flops_per_device(
  platform: str | None = None,
  device_kind: str | None = None,
  override: float = 0.0,
  local_devices: int = 1,
) -> float | None:
  """Peak bf16 FLOP/s of one device; `override` > 0 wins.

  Defaults to jax.devices()[0]. Returns None for an unknown accelerator (MFU
  is then not reported; set metrics.peak_flops_per_device). On CPU the host's nominal
  peak is shared by its `local_devices` XLA CPU devices (config.mesh.cpu_devices).
  """
  if override and override > 0:
    return float(override)
  if platform is None or device_kind is None:
    dev = jax.devices()[0]
    platform = platform or dev.platform
    device_kind = device_kind or getattr(dev, "device_kind", "")
  platform = platform.lower()
  if platform in ("cuda", "rocm"):
    platform = "gpu"
  kind = (device_kind or "").lower()
  if platform == "cpu":
    return CPU_NOMINAL_PEAK_FLOPS / max(1, local_devices)
  for plat, keys, flops in _PEAK_FLOPS:
    if plat == platform and any(key in kind for key in keys):
      return flops
  return None


def compute_mfu(
  tokens_per_second: float, flops_per_token_: float, num_devices: int, peak_flops: float | None
) -> float | None:
  """Model FLOPs utilisation as a fraction (None if the peak is unknown)."""
  if not peak_flops or num_devices <= 0:
    return None
  return tokens_per_second * flops_per_token_ / (num_devices * peak_flops)


# ----------------------------------------------------------------------------
# TensorBoard.
# ----------------------------------------------------------------------------


def step_scalars(metrics) -> dict[str, float]:
  """TensorBoard names for a diagnostics train step's metrics (host values). A step
  with a drawn loop count (metrics['loops']) adds train/loops and reports the per-loop
  values of the loops it ran only."""
  out = {"train/loss": float(metrics["loss"]), "train/grad_norm": float(metrics["grad_norm"])}
  ran = width = len(metrics["residual_norm"])
  if "loops" in metrics:
    ran = int(metrics["loops"])
    out["train/loops"] = float(ran)
  # Zero-padded indices so TensorBoard sorts loops_02 before loops_10.
  num = lambda i, n: f"{i:0{max(2, len(str(n - 1)))}d}"
  for prefix, values, n in (
    ("loops/loss_", metrics["loop_loss"][:ran], width),
    ("loops/residual_norm_", metrics["residual_norm"][:ran], width),
    ("grads/layer_", metrics["layer_grad_norm"], len(metrics["layer_grad_norm"])),
  ):
    out.update({prefix + num(i, n): float(v) for i, v in enumerate(values)})
  return out


class MetricsWriter:
  """Scalars to TensorBoard under `<workdir>/tb` (if enabled) and, with `jsonl`, one
  JSON object per write to `<workdir>/metrics.jsonl` for scripts and notebooks
  (process 0 only; the file is appended to, so a resumed run continues it). Each line is
  appended whole (`files.JsonlAppender`): a partial line left by a killed run is cut off
  on reopening, and a line that cannot be written (a full disk) is cut back off and
  reported once through `warn`, while training goes on (the next checkpoint's free-space
  check stops a run whose disk stays full). A remote workdir (gs://...) needs a
  filesystem that supports appending."""

  def __init__(
    self,
    workdir,
    enabled: bool = True,
    jsonl: bool = False,
    tb_subdir: str = "tb",
    warn: Callable[[str], Any] = logging.warning,
  ):
    self._writer = None
    self._jsonl = None
    self._warn = warn
    self._failing = False  # the last jsonl write failed (warned once until one succeeds)
    workdir = epath.Path(workdir)
    if jsonl and jax.process_index() == 0:
      self._jsonl = files.JsonlAppender(workdir / "metrics.jsonl")
    if enabled and jax.process_index() == 0:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._writer = tensorboardX.SummaryWriter(logdir=str(workdir / tb_subdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {name: float(np.asarray(value)) for name, value in scalars.items()}
    if self._jsonl is not None:
      # JSON has no NaN or Infinity: a non-finite value is written as null.
      finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
      try:
        self._jsonl.append({"step": int(step), **finite})
        self._failing = False
      except files.FileWriteError as e:
        if not self._failing:
          self._warn(f"warning: metrics of step {int(step)} not saved: {e}; training goes on")
        self._failing = True
    if self._writer is None:
      return
    for name, v in values.items():
      self._writer.add_scalar(name, v, global_step=int(step))

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    """Text for TensorBoard's text tab (shown as markdown; wrap code in a fence)."""
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


# ----------------------------------------------------------------------------
# Console.
# ----------------------------------------------------------------------------


def format_eta(seconds: float | None) -> str:
  """45s, 3m12s, 1h02m, 2d03h; '--' if unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "--"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
  return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_progress(
  step: int,
  total_steps: int,
  loss: float,
  tokens_per_second: float | None = None,
  mfu: float | None = None,
  eta_seconds: float | None = None,
  extra: Mapping[str, Any] | None = None,
) -> str:
  """``step 120/1000 | loss 3.1234 | 45,000 tok/s | MFU 12.3% | ETA 3m12s``."""
  parts = [f"step {int(step)}/{int(total_steps)}", f"loss {float(loss):.4f}"]
  if tokens_per_second is not None:
    parts.append(f"{float(tokens_per_second):,.0f} tok/s")
  if mfu is not None:
    parts.append(f"MFU {100.0 * float(mfu):.1f}%")
  for k, v in (extra or {}).items():
    parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
  parts.append(f"ETA {format_eta(eta_seconds)}")
  return " | ".join(parts)


class ConsoleLogger:
  """Progress lines with an ETA from the measured step rate.

  The rate is measured from the first `log` call on (so compilation before it
  is excluded): ETA = (total - step) * elapsed / (step - first_step).
  """

  def __init__(
    self,
    total_steps: int,
    *,
    print_fn: Callable[[str], Any] = print,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.total_steps = int(total_steps)
    self._print = print_fn
    self._clock = clock
    self._first: tuple[int, float] | None = None
    self._start_time = clock()

  def eta_seconds(self, step: int) -> float | None:
    now = self._clock()
    if self._first is None:
      return None
    first_step, first_time = self._first
    done = step - first_step
    if done <= 0:
      return None
    return (self.total_steps - step) * (now - first_time) / done

  def line(
    self,
    step: int,
    loss: float,
    tokens_per_second: float | None = None,
    mfu: float | None = None,
    extra: Mapping[str, Any] | None = None,
  ) -> str:
    """The progress line for `step` (updates the ETA clock, no printing)."""
    if self._first is None:
      self._first = (int(step), self._clock())
    return format_progress(
      step, self.total_steps, loss, tokens_per_second, mfu, self.eta_seconds(int(step)), extra
    )

  def log(
    self,
    step: int,
    loss: float,
    tokens_per_second: float | None = None,
    mfu: float | None = None,
    extra: Mapping[str, Any] | None = None,
  ) -> str:
    """`line` and print it with `print_fn`."""
    line = self.line(step, loss, tokens_per_second, mfu, extra)
    self._print(line)
    return line

  def summary(
    self,
    step: int,
    loss: float,
    total_tokens: int,
    elapsed_seconds: float | None = None,
    extra: Mapping[str, Any] | None = None,
  ) -> str:
    """``done 1000/1000 steps | final loss 2.9876 | 524,288,000 tokens |
    time 1h02m | 140,000 tok/s``."""
    elapsed = self._clock() - self._start_time if elapsed_seconds is None else elapsed_seconds
    parts = [
      f"done {int(step)}/{self.total_steps} steps",
      f"final loss {float(loss):.4f}",
      f"{int(total_tokens):,} tokens",
      f"time {format_eta(elapsed)}",
    ]
    if elapsed > 0:
      parts.append(f"{total_tokens / elapsed:,.0f} tok/s")
    for k, v in (extra or {}).items():
      parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    line = " | ".join(parts)
    self._print(line)
    return line
