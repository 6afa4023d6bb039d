"""Next-token losses over loops: END, STEP and FEW placement (arXiv:2605.18797).

Per-loop losses run in a lax.map whose body is rematerialised, so STEP/FEW hold
one [B, T, V] float32 logit tensor at a time, never K of them.

With a loop count given per call (`loop_count`, random-depth training; see
model/windowed.py) the placements keep their meaning relative to that count n and are
taken inside the gradient window, the last min(n, k) loops (`ModelConfig.
trained_loss_loops`): END is loop n - 1, STEP the mean over the window's loops, FEW the
mean over loops max(2n // 3, n - k)..n - 1. With backprop_loops=0 (k = every loop) this is
the fixed-K loss at K = n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flt_jax.constants import IGNORE_LABEL
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.windowed import windowed_loops


def token_nll(logits_BxTxV, targets_BxT):
  """Per-token negative log-likelihood (0 where targets == IGNORE_LABEL) and the valid mask."""
  valid_BxT = targets_BxT != IGNORE_LABEL
  safe_targets = jnp.where(valid_BxT, targets_BxT, 0)
  logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked = jnp.take_along_axis(logits_BxTxV, safe_targets[..., None], axis=-1)[..., 0]
  return jnp.where(valid_BxT, logz - picked, 0.0), valid_BxT


def mean_nll(logits_BxTxV, targets_BxT):
  nll_BxT, valid_BxT = token_nll(logits_BxTxV, targets_BxT)
  return jnp.sum(nll_BxT) / jnp.maximum(jnp.sum(valid_BxT), 1)


def loss_fn(
  params,
  model: LoopedTransformer,
  inputs_BxT,
  targets_BxT,
  *,
  loops: int | None = None,
  loop_count=None,
  diagnostics: bool = False,
  segment_ids_BxT=None,
  positions_BxT=None,
):
  """Returns (loss, aux). aux['residual_norm'] is [K]; with diagnostics, aux['loop_loss']
  is [K], every loop's loss (only the loss type's loops carry gradient).

  `loop_count` (an int32 scalar, may be traced; replaces `loops`): run that many loops
  with gradient through the last `cfg.gradient_window` (model/windowed.py); aux arrays
  are then [cfg.max_count], 0 for the loops not run.

  segment_ids_BxT / positions_BxT describe packed documents; the model uses them only
  when `cfg.separate_documents` is set (see LoopedTransformer)."""
  if loop_count is not None:
    return _windowed_loss_fn(
      params,
      model,
      inputs_BxT,
      targets_BxT,
      loop_count,
      diagnostics=diagnostics,
      segment_ids_BxT=segment_ids_BxT,
      positions_BxT=positions_BxT,
    )
  cfg = model.cfg
  loops = cfg.loops if loops is None else loops
  variables = {"params": params}
  loss_loops = cfg.loss_loops(loops)

  def loop_loss(h_BxTxD):
    return mean_nll(model.apply(variables, h_BxTxD, method=model.logits), targets_BxT)

  loop_loss = jax.checkpoint(loop_loss, prevent_cse=False)
  packing = dict(segment_ids_BxT=segment_ids_BxT, positions_BxT=positions_BxT)
  aux = {}
  if loss_loops == (loops - 1,) and not diagnostics:
    h_BxTxD, residual_norm_K = model.apply(
      variables, inputs_BxT, loops, method=model.hidden_states, **packing
    )
    loss = loop_loss(h_BxTxD)
  else:
    h_KxBxTxD, residual_norm_K = model.apply(
      variables, inputs_BxT, loops, True, method=model.hidden_states, **packing
    )
    picked = jnp.asarray(loss_loops)
    loss = jnp.mean(jax.lax.map(loop_loss, h_KxBxTxD[picked]))
    if diagnostics:
      aux["loop_loss"] = jax.lax.map(loop_loss, jax.lax.stop_gradient(h_KxBxTxD))
  aux["residual_norm"] = residual_norm_K
  return loss, aux


def window_loss_weights(loss_type: str, count, loop_index_W):
  """1.0 for the window slots whose loop's loss the loss type averages at `count` loops,
  0.0 elsewhere (empty slots included): ModelConfig.trained_loss_loops, traced."""
  first = {"END": count - 1, "STEP": 0, "FEW": (2 * count) // 3}[loss_type]
  return ((loop_index_W >= first) & (loop_index_W >= 0)).astype(jnp.float32)


def _windowed_loss_fn(
  params, model, inputs_BxT, targets_BxT, count, *, diagnostics, segment_ids_BxT, positions_BxT
):
  """loss_fn at a per-call loop count: see the module docstring."""
  cfg = model.cfg

  def loss_with(params_, h_BxTxD):
    return mean_nll(model.apply({"params": params_}, h_BxTxD, method=model.logits), targets_BxT)

  loop_loss = jax.checkpoint(lambda h: loss_with(params, h), prevent_cse=False)
  end_only = cfg.loss_type == "END" and not diagnostics
  out = windowed_loops(
    model,
    params,
    inputs_BxT,
    count,
    all_loops=not end_only,
    prefix_fn=loss_with if diagnostics else None,
    segment_ids_BxT=segment_ids_BxT,
    positions_BxT=positions_BxT,
  )
  aux = {"residual_norm": out.residual_norm_N}
  if end_only:
    return loop_loss(out.h_BxTxD), aux
  weights_W = window_loss_weights(cfg.loss_type, count, out.loop_index_W)

  def slot_loss(xs):  # slots outside the loss skip the head (forward and backward)
    h_BxTxD, weight = xs
    return jax.lax.cond(weight > 0, loop_loss, lambda _: jnp.zeros((), jnp.float32), h_BxTxD)

  losses_W = jax.lax.map(slot_loss, (out.h_WxBxTxD, weights_W))
  loss = jnp.sum(weights_W * losses_W) / jnp.sum(weights_W)
  if diagnostics:
    window_losses = jax.lax.map(loop_loss, jax.lax.stop_gradient(out.h_WxBxTxD))
    slot_loop = jnp.where(out.loop_index_W >= 0, out.loop_index_W, cfg.max_count)
    aux["loop_loss"] = out.prefix_values_N.at[slot_loop].set(window_losses, mode="drop")
  return loss, aux
