"""The scoring interface shared by CORE (eval/core.py) and lm-eval (eval/lm_eval_adapter.py),
and the host side of scoring a model with it.

A `ScoreFn` maps (context tokens, continuation tokens) pairs to (sum of the continuation's
log-probabilities, every continuation token greedy). `make_score_fn` builds one from a
function that scores padded rows on the device (Evaluator.score_fn passes the sharded
score step): each pair becomes one row of at most `max_len` input tokens, the context
left-truncated to fit; rows are right-padded to a bucketed length (causal attention:
padding after a position cannot change it) and scored `rows` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Pair = tuple[Sequence[int], Sequence[int]]
ScoreFn = Callable[[Sequence[Pair]], list[tuple[float, bool]]]
# (inputs_BxT, targets_BxT, mask_BxT) numpy -> (sum_logprob_B, all_greedy_B) numpy
RowsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def bucket_length(n: int, max_len: int, min_bucket: int = 16) -> int:
  """Pad lengths to powers of two so a task compiles a handful of shapes, not one per row."""
  return min(max_len, max(min_bucket, 1 << max(0, (n - 1).bit_length())))


def _rows(pairs: Sequence[Pair], max_len: int) -> list[tuple[list[int], list[int], int]]:
  """(inputs, targets, continuation length) of each pair, its last max_len + 1 tokens."""
  rows = []
  for i, (context, continuation) in enumerate(pairs):
    if not context or not continuation:
      raise ValueError(
        f"pair {i} has an empty {'context' if not context else 'continuation'}; "
        "every continuation token needs a preceding token to be predicted from"
      )
    if len(continuation) > max_len:
      raise ValueError(
        f"pair {i}: its continuation of {len(continuation)} tokens does not fit "
        f"max_len={max_len}; raise max_len (--eval_max_len) to at least {len(continuation) + 1}"
      )
    sequence = (list(context) + list(continuation))[-(max_len + 1) :]
    rows.append((sequence[:-1], sequence[1:], len(continuation)))
  return rows


def make_score_fn(
  score_rows: RowsFn, max_len: int, *, rows: int, pad_id: int = 0, min_bucket: int = 16
) -> ScoreFn:
  """A ScoreFn that scores `rows` padded rows per `score_rows` call; a last partial call
  is filled with empty rows (mask all False), so every call has the same batch size."""
  if max_len < 2:
    raise ValueError(f"max_len={max_len} must be at least 2 (one context + one target)")
  if rows < 1:
    raise ValueError(f"rows={rows} must be at least 1")

  def score_fn(pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    prepared = _rows(pairs, max_len)
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    by_bucket: dict[int, list[int]] = {}
    for i, (inputs, _, _) in enumerate(prepared):
      by_bucket.setdefault(bucket_length(len(inputs), max_len, min_bucket), []).append(i)
    for length, members in sorted(by_bucket.items()):
      for start in range(0, len(members), rows):
        chunk = members[start : start + rows]
        inputs_BxT = np.full([rows, length], pad_id, np.int32)
        targets_BxT = np.zeros([rows, length], np.int32)
        mask_BxT = np.zeros([rows, length], bool)
        for b, i in enumerate(chunk):
          inputs, targets, n_cont = prepared[i]
          inputs_BxT[b, : len(inputs)] = inputs
          targets_BxT[b, : len(targets)] = targets
          mask_BxT[b, len(targets) - n_cont : len(targets)] = True
        sums_B, greedy_B = score_rows(inputs_BxT, targets_BxT, mask_BxT)
        for b, i in enumerate(chunk):
          results[i] = (float(sums_B[b]), bool(greedy_B[b]))
    return results  # type: ignore[return-value]

  return score_fn
