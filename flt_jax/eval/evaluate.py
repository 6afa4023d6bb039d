"""Validation metrics: loss, bits per byte and (synthetic tasks) answer accuracy,
at any loop count, so restored checkpoints can be swept over K (test-time compute)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from flt_jax.train.step import eval_step


def make_eval_fn(model):
  """jit-compiled eval_step; `loops` is static, so each K compiles once."""
  return jax.jit(functools.partial(eval_step, model=model), static_argnames=("loops",))


def evaluate(
  eval_fn,
  params,
  batches: Iterable[dict],
  token_bytes_V,
  *,
  loops: int,
  max_batches: int | None = None,
) -> dict[str, float]:
  """Averages over `batches` (a finite iterable of numpy batches)."""
  token_bytes_V = jnp.asarray(token_bytes_V, jnp.int32)
  totals: dict[str, float] = {}
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = {k: batch[k] for k in ("inputs", "targets", "answer_mask") if k in batch}
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
  eval_fn, params, make_batches, token_bytes_V, loops_list, *, max_batches=None
) -> dict[int, dict[str, float]]:
  """evaluate() at each K in loops_list; make_batches() gives a fresh iterable each time."""
  return {
    int(k): evaluate(
      eval_fn, params, make_batches(), token_bytes_V, loops=int(k), max_batches=max_batches
    )
    for k in loops_list
  }
