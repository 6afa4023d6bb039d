"""Pure train and eval steps: functions of (state, batch) that main jit-compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flt_jax.constants import IGNORE_LABEL
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import loss_fn, token_nll
from flt_jax.train.state import TrainState


def split_micro_batches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B // num_micro, ...] for every array in the batch."""

  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(
        f"batch of {x.shape[0]} sequences does not split into {num_micro} "
        "micro-batches; make train.total_batch_tokens a multiple of "
        "micro_batch_size * seq_len"
      )
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])

  return jax.tree_util.tree_map(split, batch)


def per_layer_grad_norms(grads):
  """[L] gradient L2 norm of each layer (all block matrices share the leading layer axis)."""
  leaves = jax.tree_util.tree_leaves(grads["blocks"])
  sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in leaves)
  return jnp.sqrt(sq)


def train_step(
  state: TrainState,
  batch,
  *,
  model: LoopedTransformer,
  optimizer: optax.GradientTransformation,
  num_micro: int = 1,
  diagnostics: bool = False,
):
  """One optimizer update from `batch` ({'inputs','targets'} [B, T]), accumulating
  gradients over num_micro micro-batches. Each micro-batch is weighted by its share
  of valid target tokens, so the update equals that of one large batch. A non-finite
  loss or gradient skips the update and is counted."""
  micro = split_micro_batches({"inputs": batch["inputs"], "targets": batch["targets"]}, num_micro)
  tokens_M = jnp.sum(micro["targets"] != IGNORE_LABEL, axis=(1, 2)).astype(jnp.float32)
  weights_M = tokens_M / jnp.maximum(jnp.sum(tokens_M), 1.0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, xs):
    loss_sum, grads_sum, aux_sum = carry
    mb, weight = xs
    (loss, aux), grads = grad_fn(
      state.params, model, mb["inputs"], mb["targets"], diagnostics=diagnostics
    )
    grads_sum = jax.tree_util.tree_map(lambda a, g: a + weight * g, grads_sum, grads)
    aux_sum = jax.tree_util.tree_map(lambda a, x: a + weight * x, aux_sum, aux)
    return (loss_sum + weight * loss, grads_sum, aux_sum), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
  aux_shape = jax.eval_shape(
    lambda: loss_fn(
      state.params, model, first_mb["inputs"], first_mb["targets"], diagnostics=diagnostics
    )[1]
  )
  aux_zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  (loss, grads, aux), _ = jax.lax.scan(
    accumulate, (jnp.zeros(()), zeros, aux_zeros), (micro, weights_M)
  )

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + jnp.where(finite, 1, 0).astype(jnp.int32),
    params=keep(new_params, state.params),
    opt_state=keep(new_opt_state, state.opt_state),
    nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
    nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite,
    "tokens": jnp.sum(tokens_M),
    **aux,
  }
  if diagnostics:
    metrics["layer_grad_norm"] = per_layer_grad_norms(grads)
  return new_state, metrics


def eval_step(params, batch, token_bytes_V, *, model: LoopedTransformer, loops: int | None = None):
  """Sums for validation loss, bits per byte and answer accuracy over one batch."""
  logits_BxTxV = model.apply({"params": params}, batch["inputs"], loops)
  nll_BxT, valid_BxT = token_nll(logits_BxTxV, batch["targets"])
  safe_targets = jnp.where(valid_BxT, batch["targets"], 0)
  sums = {
    "nll": jnp.sum(nll_BxT),
    "tokens": jnp.sum(valid_BxT),
    "bytes": jnp.sum(jnp.where(valid_BxT, token_bytes_V[safe_targets], 0)),
  }
  if "answer_mask" in batch:
    answer_BxT = (batch["answer_mask"] > 0) & valid_BxT
    correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"]) & answer_BxT
    # An answer counts as right only if every one of its tokens is.
    wrong_B = jnp.sum(answer_BxT & ~correct_BxT, axis=1)
    has_answer_B = jnp.any(answer_BxT, axis=1)
    sums["answers"] = jnp.sum(has_answer_B)
    sums["answers_correct"] = jnp.sum(has_answer_B & (wrong_B == 0))
  return sums
