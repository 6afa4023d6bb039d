"""Per-token exit over successive loops (adaptive computation at inference).

A token runs loops until its criterion fires, then stops being computed: its h is frozen
at its last computed loop, and a later token that attends to it at a deeper loop reads
that loop's keys/values (model/decode.py keeps them). The criteria, measured after loop i
(0-based; i + 1 loops run) from the token's own h and head:

  latent_diff:x     ||h_i - h_{i-1}|| / ||h_{i-1}|| < x   (the h_change eval reports)
  kl:x              KL(p_i || p_{i-1}) < x, p = softmax of the head's logits
  argmax_stable:n   the top token has been the same for the last n loops

A token exits once its criterion fires and it has run at least `min_loops` loops, and at
`max_loops` whatever the criterion says. The comparisons are strict and n = 0 is off, so
a threshold of 0 never fires: every token runs max_loops loops, exactly the fixed-K
forward. kl and argmax_stable read the head (a [D, V] product) after every loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

CRITERIA = ("latent_diff", "kl", "argmax_stable")
_EXAMPLE = "latent_diff:0.03, kl:5e-4 or argmax_stable:3"


@dataclasses.dataclass(frozen=True)
class ExitRule:
  """When a token stops looping: its criterion fires (and it has run min_loops), or it
  has run max_loops loops (in generation the cache's K; 0 while not known yet)."""

  criterion: str
  threshold: float
  min_loops: int = 1
  max_loops: int = 0

  @property
  def label(self) -> str:
    """criterion:threshold as given (argmax_stable's n as an integer)."""
    if self.criterion == "argmax_stable":
      return f"{self.criterion}:{int(self.threshold)}"
    return f"{self.criterion}:{self.threshold:g}"

  @property
  def reads_head(self) -> bool:
    """Whether the criterion needs the next-token distribution after every loop."""
    return self.criterion in ("kl", "argmax_stable")


def parse_exit(text: str, *, flag: str = "--exit", min_loops: int = 1, max_loops: int) -> ExitRule:
  """'criterion:threshold' -> ExitRule; ValueError in one line naming the flag and the fix."""
  name, sep, value = text.strip().partition(":")
  name = name.strip()

  def bad(why: str) -> ValueError:
    return ValueError(f"{flag}={text} is invalid: {why}; give criterion:threshold, e.g. {_EXAMPLE}")

  if name not in CRITERIA:
    raise bad(f"unknown criterion {name!r} (known: {', '.join(CRITERIA)})")
  if not sep or not value.strip():
    raise bad(f"{name} needs a threshold after ':'")
  try:
    threshold = float(value)
  except ValueError:
    raise bad(f"the threshold {value.strip()!r} is not a number") from None
  if not math.isfinite(threshold) or threshold < 0:
    raise bad("the threshold must be a finite number >= 0 (0 never exits)")
  if name == "argmax_stable" and threshold != int(threshold):
    raise bad("argmax_stable counts loops: its n must be a whole number (0 = off)")
  check_loop_bounds(min_loops, max_loops)
  return ExitRule(name, threshold, int(min_loops), int(max_loops))


def with_max_loops(rule: ExitRule, max_loops: int) -> ExitRule:
  """The rule with its loop cap set (a rule parsed with max_loops=0 waits for the trained
  K); ValueError if it falls below min_loops."""
  check_loop_bounds(rule.min_loops, max_loops)
  return dataclasses.replace(rule, max_loops=int(max_loops))


def parse_exit_list(text: str, *, flag: str, min_loops: int = 1, max_loops: int) -> list[ExitRule]:
  """A comma-separated list of criterion:threshold (each parsed by parse_exit)."""
  items = [item for item in text.split(",") if item.strip()]
  if not items:
    raise ValueError(f"{flag}={text} is invalid: it lists no criterion:threshold, e.g. {_EXAMPLE}")
  return [parse_exit(item, flag=flag, min_loops=min_loops, max_loops=max_loops) for item in items]


def check_loop_bounds(min_loops: int, max_loops: int) -> None:
  """min_loops >= 1 and max_loops >= min_loops (max_loops 0: not known yet)."""
  if min_loops < 1:
    raise ValueError(f"--min_loops={min_loops} is invalid: a token runs at least 1 loop")
  if max_loops and max_loops < min_loops:
    raise ValueError(
      f"the exit's max_loops={max_loops} is below min_loops={min_loops}; raise the loop "
      f"count or lower --min_loops to at most {max_loops}"
    )


class ExitState(NamedTuple):
  """Each token's progress through the loops of one pass.

  active_BxT: still computed; loops_BxT: loops it has run (its exit loop once inactive);
  previous_BxTxV: the last loop's log-probabilities (kl) or previous_BxT its top token
  (argmax_stable), else an empty placeholder; streak_BxT: loops in a row with that top
  token.
  """

  active_BxT: jax.Array
  loops_BxT: jax.Array
  previous: jax.Array
  streak_BxT: jax.Array


def start(rule: ExitRule, batch: int, length: int, vocab: int) -> ExitState:
  """Every token active, none of its loops run."""
  shape = (batch, length)
  if rule.criterion == "kl":
    previous = jnp.zeros(shape + (vocab,), jnp.float32)
  elif rule.criterion == "argmax_stable":
    previous = jnp.full(shape, -1, jnp.int32)
  else:
    previous = jnp.zeros((0,), jnp.float32)
  zeros = jnp.zeros(shape, jnp.int32)
  return ExitState(jnp.ones(shape, bool), zeros, previous, zeros)


def relative_change(h_before_BxTxD, h_after_BxTxD):
  """||after - before|| / ||before|| per token (any leading axes), in float32: latent_diff's
  measure and the h_change that evaluation reports (eval/step.h_change_sums)."""
  before = h_before_BxTxD.astype(jnp.float32)
  step_BxT = jnp.linalg.norm(h_after_BxTxD.astype(jnp.float32) - before, axis=-1)
  return step_BxT / jnp.maximum(jnp.linalg.norm(before, axis=-1), jnp.finfo(jnp.float32).tiny)


def after_loop(
  rule: ExitRule,
  state: ExitState,
  loop_index,
  h_before_BxTxD,
  h_after_BxTxD,
  logits_fn: Callable | None,
  threshold,
) -> ExitState:
  """The state once loop `loop_index` has run for the active tokens: h_before is the h
  the loop started from, h_after the one it produced; logits_fn(h) -> [B, T, V] (only
  for criteria that read the head). `threshold` may be traced (one program for every
  threshold of a criterion)."""
  active_BxT = state.active_BxT
  done_BxT = jnp.full(active_BxT.shape, loop_index + 1, jnp.int32)
  previous, streak_BxT = state.previous, state.streak_BxT
  never = jnp.inf
  if rule.criterion == "latent_diff":
    measure_BxT = relative_change(h_before_BxTxD, h_after_BxTxD)
    fires_BxT = (loop_index > 0) & (measure_BxT < threshold)
  elif rule.criterion == "kl":
    logp_BxTxV = jax.nn.log_softmax(logits_fn(h_after_BxTxD).astype(jnp.float32), axis=-1)
    kl_BxT = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - previous), axis=-1)
    # rounding can make a KL of near-equal distributions slightly negative
    measure_BxT = jnp.where(loop_index > 0, jnp.maximum(kl_BxT, 0.0), never)
    fires_BxT = measure_BxT < threshold
    previous = jnp.where(active_BxT[..., None], logp_BxTxV, previous)
  else:  # argmax_stable
    top_BxT = jnp.argmax(logits_fn(h_after_BxTxD), axis=-1).astype(jnp.int32)
    run_BxT = jnp.where(top_BxT == previous, streak_BxT + 1, 1)
    fires_BxT = (threshold > 0) & (run_BxT >= threshold)
    previous = jnp.where(active_BxT, top_BxT, previous)
    streak_BxT = jnp.where(active_BxT, run_BxT, streak_BxT)
  exits_BxT = (fires_BxT & (done_BxT >= rule.min_loops)) | (done_BxT >= rule.max_loops)
  return ExitState(
    active_BxT & ~exits_BxT,
    jnp.where(active_BxT, done_BxT, state.loops_BxT),
    previous,
    streak_BxT,
  )
