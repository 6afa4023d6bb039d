"""Optimizer: Muon for block matrices, AdamW for embedding and lm_head.

Recipe (the official implementation's, which follows nanochat):

* Global-norm clip (``optim.grad_clip``, 1.0) of the whole gradient, before the
  split into groups (0 disables it).
* Muon (``optax.contrib.muon``) for every leaf under ``params['blocks']``:
  lr ``matrix_lr`` (0.02), Nesterov, ``ns_steps`` (5) Newton-Schulz steps with
  the standard quintic coefficients (3.4445, -4.7750, 2.0315), momentum warmed
  linearly from 0.85 to 0.95 over the first 300 steps (`muon_momentum`).
* AdamW (betas 0.8/0.95, eps 1e-10, weight decay ``optim.weight_decay`` = 0) for
  ``wte`` (lr 0.2) and ``lm_head`` (lr 0.004), both times (d_model/768)**-0.5.
* Every group's lr is multiplied by `lr_multiplier`: optional linear warmup,
  constant, then a linear warm-down to 0 over the last ``warmdown_frac``.

Muon details and how they relate to the reference (nanochat ``Muon``):

* Layout. Block leaves are stacked ``[L, in, out]`` (flax kernels, ``x @ W``).
  We pass ``MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)``: axis 0
  is a batch axis, so Newton-Schulz runs independently per layer on the
  ``[in, out]`` matrix (optax vmaps over batch axes). A plain 2-D leaf also
  works; leaves of rank > 3 are rejected (they would silently be treated as
  extra batch axes).
* Shape scaling. optax's default (``consistent_rms=None``) multiplies the
  orthogonalised update by ``sqrt(max(1, fan_out / fan_in))`` with fan_in =
  size of the reduction axis (``in``) and fan_out = size of the output axis
  (``out``). The reference multiplies by ``max(1, rows/cols)**0.5`` on torch's
  ``[out, in]`` weight, i.e. ``sqrt(max(1, out/in))``: identical. (So
  ``c_fc`` [D, 4D] gets a factor 2, ``c_proj`` [4D, D] gets 1.)
* Momentum. Both use ``buf = b*buf + (1-b)*g`` and the Nesterov mix
  ``b*buf + (1-b)*g``. optax additionally bias-corrects both terms (dividing by
  ``1-b**(t+1)`` and ``1-b**t``). Newton-Schulz normalises by the Frobenius
  norm, so a common scale has no effect; only the relative weight of the two
  terms differs from the reference, by factors that tend to 1 within a few
  dozen steps. This is the closest optax allows without re-implementing Muon.
* Precision. Newton-Schulz runs in the parameter dtype (float32 here); the
  reference runs it in bfloat16. Its normalisation epsilon is 1e-7 (as in the
  reference) rather than optax's default 1e-8.
* Momentum warm-up is done with ``optax.inject_hyperparams``: ``beta`` and
  ``learning_rate`` of muon are schedules of the injected step count, so the
  opt state carries the current values (``hyperparams['beta']`` etc.).

Step convention: all schedules are evaluated at the number of optimizer updates
already applied (0 for the first update), matching the reference, which sets the
lr/momentum for iteration ``it`` before ``opt.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flt_jax.errors import config_error
from flt_jax.train import config as train_config_lib

MUON = "muon"
ADAMW = "adamw"

# Internal group names: one Muon group and two AdamW groups (different lrs).
_EMBEDDING = "embedding"
_LM_HEAD = "lm_head"
_TOP_LEVEL_GROUPS = {"wte": _EMBEDDING, "lm_head": _LM_HEAD, "blocks": MUON}

# Newton-Schulz normalisation epsilon of the reference implementation.
MUON_NS_EPS = 1e-7
# Reference model width for the AdamW lr scaling (d_model/768)**-0.5.
ADAM_LR_REFERENCE_WIDTH = 768

MUON_DIMENSION_NUMBERS = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


# ----------------------------------------------------------------------------
# Schedules (pure functions of the step; accept Python or JAX scalars).
# ----------------------------------------------------------------------------


def _is_traced_or_array(x) -> bool:
  return isinstance(x, jax.Array)


def lr_multiplier(step, total_steps: int, warmup_steps: int = 0, warmdown_frac: float = 0.2):
  """LR multiplier applied to every group.

  * ``step < warmup_steps``: ``(step + 1) / warmup_steps``;
  * ``step <= total_steps - warmdown``: 1;
  * after that: ``(total_steps - step) / warmdown`` (reaching 0 at
    ``total_steps``), with ``warmdown = round(warmdown_frac * total_steps)``;
  * clipped to [0, 1] (steps past the horizon give 0).

  Returns a Python float for Python/NumPy ``step`` and a jnp scalar for a JAX
  array (so it can be used as an optax schedule).
  """
  total_steps = int(total_steps)
  warmup_steps = int(warmup_steps)
  warmdown = int(round(warmdown_frac * total_steps))
  if _is_traced_or_array(step):
    # Every bound enters as a float32 constant: a Python int beyond int32 would overflow.
    s = jnp.asarray(step, jnp.float32)
    total, warmup = jnp.float32(total_steps), jnp.float32(warmup_steps)
    warm = (s + 1.0) / jnp.float32(max(warmup_steps, 1))
    down = (total - s) / jnp.float32(max(warmdown, 1))
    m = jnp.where(s < warmup, warm, jnp.where(s <= total - jnp.float32(warmdown), 1.0, down))
    return jnp.clip(m, 0.0, 1.0)
  s = float(step)
  if s < warmup_steps:
    m = (s + 1.0) / warmup_steps
  elif s <= total_steps - warmdown:
    m = 1.0
  else:
    m = (total_steps - s) / max(warmdown, 1)
  return float(min(max(m, 0.0), 1.0))


def muon_momentum(step, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300):
  """Muon momentum: linear from `start` (step 0) to `end` (step>=warmup)."""
  warmup_steps = int(warmup_steps)
  if _is_traced_or_array(step):
    frac = (
      jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
      if warmup_steps > 0
      else jnp.float32(1.0)
    )
    return (1.0 - frac) * start + frac * end
  frac = min(max(float(step) / warmup_steps, 0.0), 1.0) if warmup_steps > 0 else 1.0
  return float((1.0 - frac) * start + frac * end)


def adam_lr_scale(d_model: int) -> float:
  """(d_model / 768) ** -0.5, applied to the embedding and lm_head lrs."""
  return (d_model / ADAM_LR_REFERENCE_WIDTH) ** -0.5


def current_learning_rates(optim_config, d_model: int, step, total_steps: int) -> dict[str, float]:
  """Learning rates (and Muon momentum) used for the update at `step`.

  Returns keys 'lr/muon', 'lr/embedding', 'lr/lm_head', 'optim/muon_momentum'.
  """
  step = int(step)
  m = lr_multiplier(step, total_steps, optim_config.warmup_steps, optim_config.warmdown_frac)
  scale = adam_lr_scale(d_model)
  return {
    "lr/muon": optim_config.matrix_lr * m,
    "lr/embedding": optim_config.embedding_lr * scale * m,
    "lr/lm_head": optim_config.unembedding_lr * scale * m,
    "optim/muon_momentum": muon_momentum(
      step,
      optim_config.muon_momentum_start,
      optim_config.muon_momentum_end,
      optim_config.muon_momentum_warmup_steps,
    ),
  }


# ----------------------------------------------------------------------------
# Parameter groups.
# ----------------------------------------------------------------------------


def _top_key(path) -> str:
  k = path[0]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _group_labels(params) -> Any:
  """Labels each leaf 'muon' | 'embedding' | 'lm_head' (internal groups)."""
  if not isinstance(params, Mapping):
    raise ValueError(
      f"Expected the params to be a dict with top-level keys "
      f"{sorted(_TOP_LEVEL_GROUPS)}, got {type(params).__name__}."
    )
  unknown = sorted(str(k) for k in params if k not in _TOP_LEVEL_GROUPS)
  if unknown:
    raise ValueError(
      f"Unknown top-level param keys {unknown}: the optimizer assigns AdamW "
      f"to exactly 'wte' and 'lm_head' and Muon to every leaf under "
      f"'blocks'. Put new block matrices under 'blocks', or extend "
      f"flt_jax/train/optimizer.py with a group for them."
    )

  def label(path, x):
    group = _TOP_LEVEL_GROUPS[_top_key(path)]
    if group == MUON:
      ndim = getattr(x, "ndim", None)
      if ndim is None:
        ndim = len(getattr(x, "shape", ()))
      if ndim not in (2, 3):
        raise ValueError(
          f"Muon parameter {jax.tree_util.keystr(path)} has shape "
          f"{tuple(x.shape)}; expected a stacked [L, in, out] matrix (or a "
          f"2-D [in, out] matrix). Reshape it so the orthogonalised "
          f"dimensions are the last two."
        )
    return group

  return jax.tree_util.tree_map_with_path(label, params)


def param_labels(params) -> Any:
  """Pytree like `params` with 'muon' (blocks) or 'adamw' (wte, lm_head)."""
  return jax.tree.map(lambda g: MUON if g == MUON else ADAMW, _group_labels(params))


# ----------------------------------------------------------------------------
# The optimizer.
# ----------------------------------------------------------------------------


def make_optimizer(optim_config, *, d_model: int, total_steps: int) -> optax.GradientTransformation:
  """Builds clip -> partition(muon | adamw(wte) | adamw(lm_head)).

  The state is ``(clip_state, PartitionState)``; the Muon group's state is an
  ``InjectHyperparamsState`` whose ``hyperparams`` hold the current
  ``learning_rate`` and ``beta`` (momentum), see `muon_hyperparams`.
  Call ``tx.update(grads, opt_state, params)``: `params` is required (optax's
  weight-decay stages ask for it even at decay 0). Call it once per optimizer
  step (after gradient accumulation): schedules count updates.
  """
  c = optim_config
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}.")

  def mult(count):
    return lr_multiplier(count, total_steps, c.warmup_steps, c.warmdown_frac)

  def muon_lr(count):
    return c.matrix_lr * mult(count)

  def momentum(count):
    return muon_momentum(
      count, c.muon_momentum_start, c.muon_momentum_end, c.muon_momentum_warmup_steps
    )

  muon_tx = optax.inject_hyperparams(
    optax.contrib.muon, static_args=("ns_steps",), hyperparam_dtype=jnp.float32
  )(
    learning_rate=muon_lr,
    beta=momentum,
    ns_steps=int(c.ns_steps),
    eps=MUON_NS_EPS,
    weight_decay=0.0,
    nesterov=bool(c.nesterov),
    muon_weight_dimension_numbers=MUON_DIMENSION_NUMBERS,
  )

  scale = adam_lr_scale(d_model)

  def adamw(base_lr):
    return optax.adamw(
      learning_rate=lambda count: base_lr * scale * mult(count),
      b1=c.adam_b1,
      b2=c.adam_b2,
      eps=c.adam_eps,
      weight_decay=c.weight_decay,
    )

  partitioned = optax.partition(
    {
      MUON: muon_tx,
      _EMBEDDING: adamw(c.embedding_lr),
      _LM_HEAD: adamw(c.unembedding_lr),
    },
    _group_labels,
  )
  clip = optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity()
  return optax.chain(clip, partitioned)


# ----------------------------------------------------------------------------
# Horizon.
# ----------------------------------------------------------------------------


def resolve_total_steps(train_config, num_params: int, tokens_per_step: int) -> int:
  """``train.steps`` if > 0, else ceil(tokens_per_param * N / tokens_per_step).

  `num_params` is whatever the caller counts as the model size (the reference
  uses all parameters, embeddings included).
  """
  steps = int(train_config.steps)
  if steps > 0:
    return steps
  if num_params <= 0 or tokens_per_step <= 0:
    raise ValueError(
      f"Cannot derive the horizon from train.tokens_per_param: need "
      f"num_params > 0 and tokens_per_step > 0, got {num_params} and "
      f"{tokens_per_step}. Set --config.train.steps explicitly."
    )
  target_tokens = float(train_config.tokens_per_param) * num_params
  steps = max(1, math.ceil(target_tokens / tokens_per_step))
  if steps > train_config_lib.MAX_STEPS:
    raise config_error(
      "train.tokens_per_param",
      train_config.tokens_per_param,
      f"its horizon of {steps:,} steps ({target_tokens:.3g} tokens at {tokens_per_step:,} a "
      f"step) is beyond the {train_config_lib.MAX_STEPS:,} steps the 32-bit step counters hold",
      "lower train.tokens_per_param, raise train.total_batch_tokens, or set train.steps",
    )
  return steps


def muon_hyperparams(opt_state) -> dict[str, Any]:
  """The Muon group's injected hyperparams (learning_rate, beta, ...)."""
  partition_state = opt_state[1]
  inner = partition_state.inner_states[MUON]
  inner = getattr(inner, "inner_state", inner)  # MaskedState -> inject state.
  return dict(inner.hyperparams)


__all__ = [
  "MUON",
  "ADAMW",
  "MUON_DIMENSION_NUMBERS",
  "lr_multiplier",
  "muon_momentum",
  "adam_lr_scale",
  "current_learning_rates",
  "param_labels",
  "make_optimizer",
  "resolve_total_steps",
  "muon_hyperparams",
]
