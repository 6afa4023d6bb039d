"""Training-side config sections: optim, train, checkpoint, metrics.

The experiments' base config includes these sections, e.g.::

    from flt_jax.train import config as train_config
    base = train_config.get_config()
    config.optim = base.optim
    config.train = base.train
    ...

Defaults follow the official implementation's recipe (Muon for the block matrices,
AdamW for the embedding and unembedding, linear warm-down). `validate(config)` checks
these four sections (and their interplay with `config.model.seq_len` when that exists)
and raises `ConfigError` naming the field, the bad value and the fix.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import ml_collections

from flt_jax.errors import config_error

# The step counters (TrainState.step, optax's update count) are int32.
MAX_STEPS = 2**31 - 1


def get_optim_config() -> ml_collections.ConfigDict:
  """Optimizer section (Muon for block matrices, AdamW for wte / lm_head)."""
  c = ml_collections.ConfigDict()
  c.matrix_lr = 0.02  # Muon lr for every matrix under 'blocks'.
  c.embedding_lr = 0.2  # AdamW lr for wte, times (d_model/768)**-0.5.
  c.unembedding_lr = 0.004  # AdamW lr for lm_head, times (d_model/768)**-0.5.
  c.adam_b1 = 0.8
  c.adam_b2 = 0.95
  c.adam_eps = 1e-10
  c.weight_decay = 0.0  # AdamW groups only (Muon has none).
  c.muon_momentum_start = 0.85
  c.muon_momentum_end = 0.95
  c.muon_momentum_warmup_steps = 300
  c.ns_steps = 5  # Newton-Schulz iterations.
  c.nesterov = True
  c.grad_clip = 1.0  # Global-norm clip; 0 disables.
  c.warmup_steps = 0  # Linear LR warmup (steps).
  c.warmdown_frac = 0.2  # Linear warm-down to 0 over this last fraction.
  return c


def get_train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = -1  # > 0: explicit; -1: from tokens_per_param.
  c.tokens_per_param = 20.0
  c.total_batch_tokens = 524_288
  c.micro_batch_size = 32  # Global sequences per micro-batch.
  c.seed = 0
  c.eval_every = 250  # 0 disables periodic eval.
  c.eval_steps = 20
  c.log_every = 10
  # 'START,STOP': write a jax.profiler trace of steps START..STOP into WORKDIR/profile
  # (open with TensorBoard's profile plugin / xprof); '' = off.
  c.profile_steps = ""
  c.max_consecutive_nonfinite = 5
  return c


def get_checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1000
  c.keep = 3  # 0 keeps every checkpoint.
  c.async_save = True
  # Resume the data stream where the checkpoint left it (the saved grain iterator
  # state). False: restore the train state only and start the (new) data pipeline from
  # its beginning, e.g. after changing data.num_workers, data.shuffle or the corpus.
  c.restore_data = True
  return c


def get_metrics_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.peak_flops_per_device = 0.0  # 0 = look up by platform/device kind.
  c.tensorboard = True
  return c


def get_config() -> ml_collections.ConfigDict:
  """Returns a ConfigDict with sections optim, train, checkpoint, metrics."""
  config = ml_collections.ConfigDict()
  config.optim = get_optim_config()
  config.train = get_train_config()
  config.checkpoint = get_checkpoint_config()
  config.metrics = get_metrics_config()
  return config


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------

_SECTIONS = ("optim", "train", "checkpoint", "metrics")


def _get(config, name: str, default: Any = None):
  try:
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  except (AttributeError, KeyError):
    return default


def _section(config, name: str):
  section = _get(config, name)
  if section is None:
    raise config_error(
      name,
      None,
      "the section is missing",
      f"start the experiment from flt_jax/presets.py, or set config.{name} = "
      f"flt_jax.train.config.get_config().{name}",
    )
  return section


def _field(section, sect_name: str, name: str):
  value = _get(section, name, _MISSING)
  if value is _MISSING:
    default = getattr(get_config()[sect_name], name)
    raise config_error(
      f"{sect_name}.{name}",
      None,
      "the field is missing",
      f"add it (default {default!r}) or start from flt_jax.train.config.get_config()",
    )
  return value


_MISSING = object()


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_number(
  sec, sname, name, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, fix=""
):
  v = _field(sec, sname, name)
  path = f"{sname}.{name}"
  if integer and not _is_int(v):
    raise config_error(path, v, "must be an integer", fix or f"set --config.{path}=<int>")
  if not _is_number(v) or not math.isfinite(v):
    raise config_error(path, v, "must be a finite number", fix or f"set --config.{path}=<number>")
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise config_error(
      path,
      v,
      f"must be {'>' if lo_open else '>='} {lo}",
      fix or f"set --config.{path} to a value {'>' if lo_open else '>='} {lo}",
    )
  if hi is not None and (v >= hi if hi_open else v > hi):
    raise config_error(
      path,
      v,
      f"must be {'<' if hi_open else '<='} {hi}",
      fix or f"set --config.{path} to a value {'<' if hi_open else '<='} {hi}",
    )
  return v


def _check_bool(sec, sname, name):
  v = _field(sec, sname, name)
  if not isinstance(v, bool):
    raise config_error(
      f"{sname}.{name}", v, "must be True or False", f"set --config.{sname}.{name}=True or False"
    )
  return v


def validate(config) -> None:
  """Validates the optim/train/checkpoint/metrics sections of `config`.

  Raises:
    ConfigError: naming the offending field, its value and how to fix it.
  """
  for name in _SECTIONS:
    _section(config, name)

  o = config.optim
  for lr in ("matrix_lr", "embedding_lr", "unembedding_lr"):
    _check_number(o, "optim", lr, lo=0.0)
  _check_number(o, "optim", "adam_b1", lo=0.0, hi=1.0, hi_open=True)
  _check_number(o, "optim", "adam_b2", lo=0.0, hi=1.0, hi_open=True)
  _check_number(o, "optim", "adam_eps", lo=0.0, lo_open=True)
  _check_number(o, "optim", "weight_decay", lo=0.0)
  _check_number(o, "optim", "muon_momentum_start", lo=0.0, hi=1.0, hi_open=True)
  _check_number(o, "optim", "muon_momentum_end", lo=0.0, hi=1.0, hi_open=True)
  _check_number(o, "optim", "muon_momentum_warmup_steps", lo=0, integer=True)
  _check_number(o, "optim", "ns_steps", lo=1, integer=True)
  _check_bool(o, "optim", "nesterov")
  _check_number(
    o, "optim", "grad_clip", lo=0.0, fix="use a positive max global norm, or 0 to disable clipping"
  )
  _check_number(o, "optim", "warmup_steps", lo=0, integer=True)
  _check_number(o, "optim", "warmdown_frac", lo=0.0, hi=1.0)

  t = config.train
  steps = _check_number(t, "train", "steps", integer=True)
  if steps == 0 or steps < -1:
    raise config_error(
      "train.steps",
      steps,
      "must be a positive step count, or -1 for the tokens_per_param horizon",
      "set --config.train.steps=N (N >= 1) or -1",
    )
  if steps > MAX_STEPS:
    raise config_error(
      "train.steps",
      steps,
      f"must be at most {MAX_STEPS:,} (the step counters are 32-bit integers)",
      "set a smaller --config.train.steps, or -1 for the tokens_per_param horizon",
    )
  profile = t.profile_steps
  if profile and not re.fullmatch(r"\d+,\d+", str(profile)):
    raise config_error(
      "train.profile_steps",
      profile,
      "must be 'START,STOP' step numbers or ''",
      "e.g. --config.train.profile_steps=20,25",
    )
  if profile and not 0 <= int(profile.split(",")[0]) < int(profile.split(",")[1]):
    raise config_error(
      "train.profile_steps",
      profile,
      "START must be >= 0 and below STOP",
      "e.g. --config.train.profile_steps=20,25",
    )
  _check_number(t, "train", "tokens_per_param", lo=0.0, lo_open=True)
  total = _check_number(t, "train", "total_batch_tokens", lo=1, integer=True)
  micro = _check_number(t, "train", "micro_batch_size", lo=1, integer=True)
  _check_number(t, "train", "seed", integer=True)
  _check_number(
    t,
    "train",
    "eval_every",
    lo=0,
    integer=True,
    fix="use a positive interval, or 0 to disable periodic eval",
  )
  _check_number(t, "train", "eval_steps", lo=0, integer=True)
  _check_number(t, "train", "log_every", lo=1, integer=True)
  _check_number(t, "train", "max_consecutive_nonfinite", lo=1, integer=True)

  model = _get(config, "model")
  seq_len = _get(model, "seq_len") if model is not None else None
  if seq_len is not None:
    if not _is_int(seq_len) or seq_len < 1:
      raise config_error("model.seq_len", seq_len, "must be a positive integer")
    tokens_per_micro = micro * seq_len
    if total % tokens_per_micro != 0:
      below, above = nearest_multiples(total, tokens_per_micro)
      raise config_error(
        "train.total_batch_tokens",
        total,
        f"must be divisible by train.micro_batch_size * model.seq_len = "
        f"{micro} * {seq_len} = {tokens_per_micro} (one micro-batch)",
        f"set --config.train.total_batch_tokens to a multiple of "
        f"{tokens_per_micro} (e.g. {below} or {above}), or change "
        f"train.micro_batch_size / model.seq_len",
      )

  c = config.checkpoint
  _check_number(c, "checkpoint", "every_steps", lo=1, integer=True)
  _check_number(
    c,
    "checkpoint",
    "keep",
    lo=0,
    integer=True,
    fix="use a positive count, or 0 to keep every checkpoint",
  )
  _check_bool(c, "checkpoint", "async_save")
  _check_bool(c, "checkpoint", "restore_data")

  m = config.metrics
  _check_number(
    m,
    "metrics",
    "peak_flops_per_device",
    lo=0.0,
    fix="use a positive FLOP/s value, or 0 for the built-in table",
  )
  _check_bool(m, "metrics", "tensorboard")


def nearest_multiples(value: int, unit: int) -> tuple[int, int]:
  """Two distinct positive multiples of `unit` around `value`: the ones just below and
  above it, or the first two when `value` is below one unit."""
  below = value // unit * unit
  if below < unit:
    return unit, 2 * unit
  return below, below + unit


def grad_accum_steps(config) -> int:
  """Micro-batches per optimizer step: total_batch_tokens/(micro*seq_len)."""
  tokens_per_micro = config.train.micro_batch_size * config.model.seq_len
  if config.train.total_batch_tokens % tokens_per_micro:
    validate(config)  # Raises the descriptive error.
  return config.train.total_batch_tokens // tokens_per_micro
