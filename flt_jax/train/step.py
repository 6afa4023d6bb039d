"""The pure train step: a function of (state, batch) that the run layer jit-compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flt_jax.constants import IGNORE_LABEL
from flt_jax.model import loop_count
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import loss_fn
from flt_jax.train.state import TrainState


def batch_keys(model_cfg) -> tuple[str, ...]:
  """The batch arrays train_step reads: tokens and next-token targets, and with
  `model.separate_documents` the packed rows' segment ids and per-document positions."""
  documents = ("segment_ids", "positions") if model_cfg.separate_documents else ()
  return ("inputs", "targets") + documents


def document_kwargs(batch, model_cfg) -> dict:
  """The model's packed-document arguments from a batch ({} when documents attend
  across each other, as in the official implementation)."""
  if not model_cfg.separate_documents:
    return {}
  return {"segment_ids_BxT": batch["segment_ids"], "positions_BxT": batch["positions"]}


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
  max_consecutive_nonfinite: int | None = None,
  loop_seed: int = 0,
):
  """One optimizer update from `batch` (the `batch_keys` arrays, [B, T] each),
  accumulating gradients over num_micro micro-batches. Each micro-batch is weighted by
  its share of valid target tokens, so the update equals that of one large batch.

  With random loop counts or a gradient window (`model.cfg.windowed`), the step draws
  its loop count from (`loop_seed` = train.seed, the step's index step + nonfinite_total,
  which the host counts too), the same on every device, and every micro-batch runs it;
  metrics['loops'] is the count.

  A non-finite loss or gradient skips the update and is counted. With
  `max_consecutive_nonfinite`, a state that already has that many skipped updates in a
  row is returned unchanged: the run has tripped its stop rule, and the host, which
  reads the counters only now and then, still finds the state as it was at the trip,
  and the step that tripped as step + nonfinite_total."""
  micro = split_micro_batches({k: batch[k] for k in batch_keys(model.cfg)}, num_micro)
  tokens_M = jnp.sum(micro["targets"] != IGNORE_LABEL, axis=(1, 2)).astype(jnp.float32)
  weights_M = tokens_M / jnp.maximum(jnp.sum(tokens_M), 1.0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  count = None
  if model.cfg.windowed:
    count = loop_count.draw(model.cfg, loop_seed, state.step + state.nonfinite_total)

  def accumulate(carry, xs):
    loss_sum, grads_sum, aux_sum = carry
    mb, weight = xs
    (loss, aux), grads = grad_fn(
      state.params,
      model,
      mb["inputs"],
      mb["targets"],
      loop_count=count,
      diagnostics=diagnostics,
      **document_kwargs(mb, model.cfg),
    )
    grads_sum = jax.tree_util.tree_map(lambda a, g: a + weight * g, grads_sum, grads)
    aux_sum = jax.tree_util.tree_map(lambda a, x: a + weight * x, aux_sum, aux)
    return (loss_sum + weight * loss, grads_sum, aux_sum), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
  aux_shape = jax.eval_shape(
    lambda: loss_fn(
      state.params,
      model,
      first_mb["inputs"],
      first_mb["targets"],
      loop_count=count,
      diagnostics=diagnostics,
      **document_kwargs(first_mb, model.cfg),
    )[1]
  )
  aux_zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  (loss, grads, aux), _ = jax.lax.scan(
    accumulate, (jnp.zeros(()), zeros, aux_zeros), (micro, weights_M)
  )

  grad_norm = optax.global_norm(grads)
  # A diverged stream (inf residual norm) can leave a finite loss at ln(V): it counts too.
  finite = (
    jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(aux["residual_norm"]))
  )
  if max_consecutive_nonfinite is None:
    live = jnp.array(True)
  else:
    live = state.nonfinite_in_a_row < max_consecutive_nonfinite
  apply = finite & live
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)
  skipped = (~finite & live).astype(jnp.int32)
  new_state = state.replace(
    step=state.step + apply.astype(jnp.int32),
    params=keep(new_params, state.params),
    opt_state=keep(new_opt_state, state.opt_state),
    nonfinite_in_a_row=jnp.where(apply, 0, state.nonfinite_in_a_row + skipped),
    nonfinite_total=state.nonfinite_total + skipped,
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite,
    "tokens": jnp.sum(tokens_M),
    **aux,
  }
  if count is not None and model.cfg.loop_sampling != "fixed":  # a draw, not the constant K
    metrics["loops"] = count
  if diagnostics:
    metrics["layer_grad_norm"] = per_layer_grad_norms(grads)
  return new_state, metrics
