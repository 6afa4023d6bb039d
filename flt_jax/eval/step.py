"""The pure eval step: sums for loss, bits per byte and answer accuracy over one batch."""

from __future__ import annotations

import jax.numpy as jnp

from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import token_nll


def batch_keys(model_cfg) -> tuple[str, ...]:
  """The batch arrays eval_step reads when present: tokens, targets, the answer mask of
  synthetic tasks, and with `model.separate_documents` segment ids and positions."""
  documents = ("segment_ids", "positions") if model_cfg.separate_documents else ()
  return ("inputs", "targets", "answer_mask") + documents


def eval_step(params, batch, token_bytes_V, *, model: LoopedTransformer, loops: int | None = None):
  """Sums for validation loss, bits per byte and answer accuracy over one batch."""
  documents = {}
  if model.cfg.separate_documents:
    documents = {"segment_ids_BxT": batch["segment_ids"], "positions_BxT": batch["positions"]}
  logits_BxTxV = model.apply({"params": params}, batch["inputs"], loops, **documents)
  nll_BxT, valid_BxT = token_nll(logits_BxTxV, batch["targets"])
  safe_targets_BxT = jnp.where(valid_BxT, batch["targets"], 0)
  sums = {
    "nll": jnp.sum(nll_BxT),
    "tokens": jnp.sum(valid_BxT),
    "bytes": jnp.sum(jnp.where(valid_BxT, token_bytes_V[safe_targets_BxT], 0)),
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
