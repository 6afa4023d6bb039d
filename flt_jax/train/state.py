"""The train state: everything a checkpoint must hold to resume bit-for-bit."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flt_jax.model.looped import LoopedTransformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  nonfinite_in_a_row: jax.Array  # int32: consecutive skipped (non-finite) updates
  nonfinite_total: jax.Array  # int32: all skipped updates


def _init_boxed(model: LoopedTransformer, rng, seq_len: int):
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32), 1)["params"]


def init_params(model: LoopedTransformer, rng, seq_len: int):
  """Float32 params as plain arrays (logical-axis boxes removed)."""
  return nn.meta.unbox(_init_boxed(model, rng, seq_len))


def create_train_state(
  model: LoopedTransformer, optimizer: optax.GradientTransformation, rng, seq_len: int
) -> TrainState:
  params = init_params(model, rng, seq_len)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(
    step=zero,
    params=params,
    opt_state=optimizer.init(params),
    nonfinite_in_a_row=zero,
    nonfinite_total=zero,
  )
  # Optimizer states alias buffers (shared counters and scalars); the donated train
  # step needs every leaf to own its buffer.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)


def abstract_params(model: LoopedTransformer, rng, seq_len: int):
  """The params as ShapeDtypeStructs (nothing computed), inside their Flax
  `nn.Partitioned` boxes: the logical axis names from which shardings are derived."""
  return jax.eval_shape(lambda: _init_boxed(model, rng, seq_len))


def abstract_train_state(boxed_params, optimizer: optax.GradientTransformation) -> TrainState:
  """The train state as ShapeDtypeStructs around `abstract_params`' boxed params;
  `nn.meta.unbox` of it has the structure of `create_train_state`'s result."""
  counter = jax.ShapeDtypeStruct((), jnp.int32)
  return TrainState(
    step=counter,
    params=boxed_params,
    opt_state=jax.eval_shape(optimizer.init, nn.meta.unbox(boxed_params)),
    nonfinite_in_a_row=counter,
    nonfinite_total=counter,
  )


def count_params(params) -> dict[str, int]:
  total = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  embedding = int(params["wte"]["embedding"].size)
  return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
