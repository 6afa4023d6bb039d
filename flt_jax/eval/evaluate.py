"""Validation metrics: loss, bits per byte and (synthetic tasks) answer accuracy,
at any loop count, so restored checkpoints can be swept over K (test-time compute)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from flt_jax.eval.step import batch_keys, eval_step


def make_eval_fn(model):
  """eval_step, jit-compiled (`loops` is static, so each K compiles once), on the batch
  arrays it reads (`batch_keys`; the others are not sent to the device)."""
  step = jax.jit(functools.partial(eval_step, model=model), static_argnames=("loops",))
  keys = batch_keys(model.cfg)

  def eval_fn(params, batch, token_bytes_V, *, loops: int):
    return step(params, {k: batch[k] for k in keys if k in batch}, token_bytes_V, loops=loops)

  return eval_fn


def evaluate(
  eval_fn,
  params,
  batches: Iterable[dict],
  token_bytes_V,
  *,
  loops: int,
) -> dict[str, float]:
  """Averages over `batches` (a finite iterable of numpy batches)."""
  token_bytes_V = jnp.asarray(token_bytes_V, jnp.int32)
  totals: dict[str, float] = {}
  for batch in batches:
    sums = jax.device_get(eval_fn(params, batch, token_bytes_V, loops=loops))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals.get("tokens"):
    raise ValueError(
      "the validation data produced no target tokens to evaluate on; "
      "check config.data (validation split too small?)"
    )
  out = {"loss": totals["nll"] / totals["tokens"], "tokens": totals["tokens"]}
  if totals.get("bytes"):
    out["bpb"] = totals["nll"] / (math.log(2) * totals["bytes"])
  if totals.get("answers"):
    out["answer_accuracy"] = totals["answers_correct"] / totals["answers"]
  return out


def loop_sweep(
  eval_fn, params, make_batches, token_bytes_V, loops_list
) -> dict[int, dict[str, float]]:
  """evaluate() at each K in loops_list; make_batches() gives a fresh iterable each time."""
  return {
    int(k): evaluate(eval_fn, params, make_batches(), token_bytes_V, loops=int(k))
    for k in loops_list
  }
