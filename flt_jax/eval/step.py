"""The pure evaluation steps, one batch each, before any jit or sharding
(eval/evaluator.py compiles them over a mesh):

  eval_step    sums of the validation metric families: loss and bytes (loss, bpb),
               answers (answer accuracy of synthetic tasks) and, with `per_loop`, the
               families read from every loop's h (h_change)
  exit_eval_step  eval_step's sums with per-token exit (model/exit.py): the teacher-
               forced pass runs the loops side by side until each token exits, plus the
               exit loops (per target, answer and input token) and the loops it executed
  score_step   per row: the sum of log-probabilities of the masked target tokens and
               whether each of them is the argmax (the scorers' ScoreFn, eval/scorer.py)

Sums, not means: a metric is summed over every batch (and host) and divided once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flt_jax.constants import IGNORE_LABEL, PAD_SEGMENT
from flt_jax.model import exit as exit_lib
from flt_jax.model.decode import CachedDecoder
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import token_nll


def batch_keys(model_cfg) -> tuple[str, ...]:
  """The batch arrays eval_step reads when present: tokens, targets, the answer mask of
  synthetic tasks, and with `model.separate_documents` segment ids and positions."""
  documents = ("segment_ids", "positions") if model_cfg.separate_documents else ()
  return ("inputs", "targets", "answer_mask") + documents


def exit_batch_keys(model_cfg) -> tuple[str, ...]:
  """exit_eval_step's batch arrays: eval_step's and the segment ids (padding, which does
  not keep the loops going, is segment PAD_SEGMENT)."""
  keys = batch_keys(model_cfg)
  return keys if "segment_ids" in keys else keys + ("segment_ids",)


def _documents(model: LoopedTransformer, batch) -> dict:
  if not model.cfg.separate_documents:
    return {}
  return {"segment_ids_BxT": batch["segment_ids"], "positions_BxT": batch["positions"]}


def loss_sums(logits_BxTxV, targets_BxT, token_bytes_V) -> dict:
  """nll, tokens and bytes of the valid targets: loss = nll / tokens, bits per byte =
  nll / (ln 2 * bytes)."""
  nll_BxT, valid_BxT = token_nll(logits_BxTxV, targets_BxT)
  safe_targets_BxT = jnp.where(valid_BxT, targets_BxT, 0)
  return {
    "nll": jnp.sum(nll_BxT),
    "tokens": jnp.sum(valid_BxT),
    "bytes": jnp.sum(jnp.where(valid_BxT, token_bytes_V[safe_targets_BxT], 0)),
  }


def answer_sums(logits_BxTxV, targets_BxT, answer_mask_BxT) -> dict:
  """Rows with an answer, and rows whose every answer token is the argmax."""
  answer_BxT = (answer_mask_BxT > 0) & (targets_BxT != IGNORE_LABEL)
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT) & answer_BxT
  wrong_B = jnp.sum(answer_BxT & ~correct_BxT, axis=1)
  has_answer_B = jnp.any(answer_BxT, axis=1)
  return {
    "answers": jnp.sum(has_answer_B),
    "answers_correct": jnp.sum(has_answer_B & (wrong_B == 0)),
  }


def h_change_sums(h_KxBxTxD, valid_BxT) -> dict:
  """h_change_K1 [K-1]: for each loop i >= 1, ||h(i) - h(i-1)|| / ||h(i-1)|| summed over
  the valid tokens (divided by `tokens` later). Near 0 at the last loop: more loops would
  barely move the prediction."""
  relative_K1xBxT = exit_lib.relative_change(h_KxBxTxD[:-1], h_KxBxTxD[1:])
  return {"h_change_K1": jnp.sum(jnp.where(valid_BxT, relative_K1xBxT, 0.0), axis=(1, 2))}


def eval_step(
  params,
  batch,
  token_bytes_V,
  *,
  model: LoopedTransformer,
  loops: int | None = None,
  per_loop: bool = False,
):
  """Sums for validation loss, bits per byte and answer accuracy over one batch; with
  `per_loop`, the forward keeps every loop's h ([K, B, T, D]) and the per-loop families
  (h_change) are added, the logits coming from the last loop's h as without it."""
  variables = {"params": params}
  documents = _documents(model, batch)
  if per_loop:
    h_KxBxTxD, _ = model.apply(
      variables, batch["inputs"], loops, True, method=model.hidden_states, **documents
    )
    logits_BxTxV = model.apply(variables, h_KxBxTxD[-1], method=model.logits)
  else:
    logits_BxTxV = model.apply(variables, batch["inputs"], loops, **documents)
  sums = loss_sums(logits_BxTxV, batch["targets"], token_bytes_V)
  if "answer_mask" in batch:
    sums.update(answer_sums(logits_BxTxV, batch["targets"], batch["answer_mask"]))
  if per_loop:
    sums.update(h_change_sums(h_KxBxTxD, batch["targets"] != IGNORE_LABEL))
  return sums


def _answer_tokens(batch):
  """[B, T] bool: the answer targets of synthetic tasks (False without an answer mask)."""
  targets_BxT = batch["targets"]
  if "answer_mask" not in batch:
    return jnp.zeros(targets_BxT.shape, bool)
  return (batch["answer_mask"] > 0) & (targets_BxT != IGNORE_LABEL)


def exit_sums(exit_loops_BxT, valid_BxT, answer_BxT, real_BxT, loops_run) -> dict:
  """The compute of a pass with per-token exit: summed exit loops over the valid targets
  (divided by `tokens` later), over the answer targets and over the real input tokens
  (with their counts), and the loop iterations the pass executed (`loops_run`, once per
  batch that has real tokens, counted by `batches`)."""
  loops_BxT = exit_loops_BxT.astype(jnp.float32)
  has_tokens = jnp.any(real_BxT)
  return {
    "exit_loops": jnp.sum(jnp.where(valid_BxT, loops_BxT, 0.0)),
    "exit_loops_answers": jnp.sum(jnp.where(answer_BxT, loops_BxT, 0.0)),
    "answer_tokens": jnp.sum(answer_BxT),
    "exit_loops_inputs": jnp.sum(jnp.where(real_BxT, loops_BxT, 0.0)),
    "input_tokens": jnp.sum(real_BxT),
    "loops_run": jnp.where(has_tokens, loops_run, 0),
    "batches": has_tokens.astype(jnp.int32),
  }


def exit_eval_step(
  params,
  batch,
  token_bytes_V,
  threshold,
  *,
  model: LoopedTransformer,
  rule: exit_lib.ExitRule,
):
  """eval_step's sums (loss, bpb, answer accuracy) with per-token exit, and exit_sums.

  The teacher-forced pass (CachedDecoder.forward_exit) runs rule.max_loops loops at most
  over the whole batch, loop by loop: a token stops at its exit, later tokens read its
  last computed loop's keys/values, which is what decoding the tokens one at a time
  computes. The logits of each token come from its h at its exit. `threshold` is traced
  (one program per criterion and loop bounds)."""
  documents = _documents(model, batch)
  real_BxT = batch["segment_ids"] != PAD_SEGMENT
  h_BxTxD, exits = CachedDecoder(model.cfg).forward_exit(
    params, batch["inputs"], rule, threshold, real_BxT=real_BxT, **documents
  )
  logits_BxTxV = model.apply({"params": params}, h_BxTxD, method=model.logits)
  sums = loss_sums(logits_BxTxV, batch["targets"], token_bytes_V)
  if "answer_mask" in batch:
    sums.update(answer_sums(logits_BxTxV, batch["targets"], batch["answer_mask"]))
  valid_BxT = batch["targets"] != IGNORE_LABEL
  sums.update(
    exit_sums(exits.exit_loops_BxT, valid_BxT, _answer_tokens(batch), real_BxT, exits.loops_run)
  )
  return sums


def score_step(params, batch, *, model: LoopedTransformer, loops: int):
  """(sum_logprob_B, all_greedy_B) over the tokens of `batch['mask']`: the log-probability
  (float32 log-softmax of the logits) of each target, and whether every masked target is
  the argmax. Rows are single sequences from position 0 (no packing)."""
  logits_BxTxV = model.apply({"params": params}, batch["inputs"], loops).astype(jnp.float32)
  logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  targets_BxT, mask_BxT = batch["targets"], batch["mask"]
  target_BxT = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  sum_logprob_B = jnp.sum(jnp.where(mask_BxT, target_BxT, 0.0), axis=-1)
  all_greedy_B = jnp.all(greedy_BxT | ~mask_BxT, axis=-1)
  return sum_logprob_B, all_greedy_B
