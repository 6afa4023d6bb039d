"""Next-token losses over loops: END, STEP and FEW placement (arXiv:2605.18797).

Per-loop losses run in a lax.map whose body is rematerialised, so STEP/FEW hold
one [B, T, V] float32 logit tensor at a time, never K of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flt_jax.constants import IGNORE_LABEL
from flt_jax.model.looped import LoopedTransformer


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
  diagnostics: bool = False,
  segment_ids_BxT=None,
  positions_BxT=None,
):
  """Returns (loss, aux). aux['residual_norm'] is [K]; with diagnostics, aux['loop_loss']
  is [K], every loop's loss (only the loss type's loops carry gradient).

  segment_ids_BxT / positions_BxT describe packed documents; the model uses them only
  when `cfg.separate_documents` is set (see LoopedTransformer)."""
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
