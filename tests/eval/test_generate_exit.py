"""Generation with per-token exit and a loop-slot budget (eval/generate.py): threshold 0
generates the fixed-K tokens for every variant; with a firing threshold the tokens and
each token's exit loop are those of the teacher-forced exit pass, and the loop
iterations counted are the ones run (batch 1: the sum of the exit loops; a batch: each
step's slowest unfinished row); --kv_loops=K is the exact cache, fewer slots hold
proportionally fewer bytes and change what later tokens read."""

import functools

import jax
import numpy as np
import pytest

from flt_jax.eval.generate import Generator
from flt_jax.model import decode
from flt_jax.model.decode import CachedDecoder
from flt_jax.model.exit import ExitRule
from tests.helpers.decoding import VARIANTS, make_cfg
from tests.helpers.models import random_params

LOOPS, NEW = 3, 6
PROMPTS = [[5, 9, 3, 22, 1], [40, 2, 2, 17, 8]]


@functools.cache
def setup(variant="FLT"):
  # GQA, a window of 4 on layer 0 (shorter than prompt + NEW), full context on layer 1
  cfg = make_cfg(variant=variant, n_head=4, n_kv_head=2, window_pattern="SL")
  return cfg, random_params(cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_zero_generates_the_fixed_k_tokens(variant):
  cfg, params = setup(variant)
  criterion = ("latent_diff", "kl", "argmax_stable")[VARIANTS.index(variant) % 3]
  out = Generator(cfg, loops=LOOPS, exit_rule=ExitRule(criterion, 0.0)).generate(
    params, PROMPTS, NEW
  )
  # the exact cached generation, itself greedy by recomputation (test_generate.py)
  assert out.rows == Generator(cfg, loops=LOOPS)(params, PROMPTS, NEW)
  assert out.rows[0] != out.rows[1]
  assert out.exit_loops == [[LOOPS] * NEW] * 2
  assert (out.steps, out.step_loops) == (NEW, NEW * LOOPS)


def _teacher_forced_exit(cfg, params, rule, tokens):
  decoder = CachedDecoder(cfg)

  def run(params, tokens_BxT):
    h_BxTxD, exits = decoder.forward_exit(params, tokens_BxT, rule)
    return decoder.logits(params, h_BxTxD), exits.exit_loops_BxT

  logits, exit_loops = jax.jit(run)(params, np.asarray(tokens, np.int32))
  return np.asarray(logits), np.asarray(exit_loops)


def test_generation_with_exit_runs_what_the_teacher_forced_pass_says():
  cfg, params = setup("FLT")
  rule = ExitRule("latent_diff", 0.5, 1, LOOPS)
  generator = Generator(cfg, loops=LOOPS, exit_rule=rule)
  singles = [generator.generate(params, [prompt], NEW) for prompt in PROMPTS]
  sequences = [prompt + out.rows[0] for prompt, out in zip(PROMPTS, singles)]
  logits, exit_loops = _teacher_forced_exit(cfg, params, rule, sequences)
  P = len(PROMPTS[0])
  for b, out in enumerate(singles):
    positions = slice(P - 1, P - 1 + NEW)  # the position each new token is predicted at
    assert out.rows[0] == logits[b, positions].argmax(-1).tolist()
    assert out.exit_loops[0] == exit_loops[b, positions].tolist()
    # batch 1: every loop iteration run is this row's
    assert out.step_loops == sum(out.exit_loops[0]) and out.steps == NEW
  assert len(np.unique(exit_loops[:, P - 1 :])) > 1  # the tokens exit at different loops
  # In a batch each row runs its own loops; a step runs its slowest row's.
  batch = generator.generate(params, PROMPTS, NEW)
  assert batch.rows == [out.rows[0] for out in singles]
  assert batch.exit_loops == [out.exit_loops[0] for out in singles]
  slowest = np.max([out.exit_loops[0] for out in singles], axis=0)
  assert batch.step_loops == slowest.sum() < sum(out.step_loops for out in singles)
  # the prompt but its last token went side by side: its slowest token's loops
  assert batch.prefill_loops == exit_loops[:, : P - 1].max()


def test_a_finished_row_does_not_keep_a_step_going():
  cfg, params = setup("FLT")
  rule = ExitRule("latent_diff", 0.5, 1, LOOPS)
  free = Generator(cfg, loops=LOOPS, exit_rule=rule).generate(params, PROMPTS, NEW)
  stop = free.rows[0][1]  # row 0 ends at its second token
  out = Generator(cfg, loops=LOOPS, exit_rule=rule, stop_token=stop).generate(params, PROMPTS, NEW)
  assert out.rows[0] == free.rows[0][:2]
  # after row 0 stopped, the steps ran row 1's loops only (until row 1 also stops)
  n = len(out.rows[1])
  want = sum(max(a, b) for a, b in zip(free.exit_loops[0][:2], free.exit_loops[1][:2]))
  want += sum(free.exit_loops[1][2:n])
  assert out.step_loops == want


def test_kv_loops_equal_to_loops_is_the_exact_cache():
  cfg, params = setup("FLT")
  tokens = np.asarray(PROMPTS, np.int32)
  exact = Generator(cfg, loops=LOOPS)
  ring = Generator(cfg, loops=LOOPS, kv_loops=decode.parse_kv_loops(str(LOOPS), LOOPS))
  assert ring.kv_loops == decode.LoopSlots(ring=LOOPS)
  np.testing.assert_array_equal(
    ring.teacher_forced(params, tokens).logits_BxTxV,
    exact.teacher_forced(params, tokens).logits_BxTxV,
  )
  assert ring(params, PROMPTS, NEW) == exact(params, PROMPTS, NEW)
  assert ring.cache_bytes(2, 20) == exact.cache_bytes(2, 20)


def test_fewer_loop_slots_read_other_loops_keys():
  cfg, params = setup("FLT")
  tokens = np.asarray(PROMPTS, np.int32)
  exact = Generator(cfg, loops=LOOPS).teacher_forced(params, tokens).logits_BxTxV
  ring = Generator(cfg, loops=LOOPS, kv_loops=decode.LoopSlots(ring=2))
  first = Generator(cfg, loops=LOOPS, kv_loops=decode.LoopSlots(first=True))
  ring_logits = ring.teacher_forced(params, tokens).logits_BxTxV
  # position 0 attends only to itself, at each loop its own keys: exact in a ring
  np.testing.assert_allclose(ring_logits[:, 0], exact[:, 0], atol=1e-5, rtol=0)
  assert np.abs(ring_logits[:, 1:] - exact[:, 1:]).max() > 1e-2  # later: loop 2 reads loop 0's
  # `first`: every loop after the first reads loop 0's keys/values (FLT's position 0 is
  # loop-invariant: its one key's value comes from the loop-invariant norm(x0))
  first_logits = first.teacher_forced(params, tokens).logits_BxTxV
  assert np.abs(first_logits[:, 1:] - exact[:, 1:]).max() > 1e-2
  assert np.abs(first_logits - ring_logits).max() > 1e-2


def test_loop_slot_budget_bytes_at_k12():
  cfg, _ = setup("FLT")
  exact = Generator(cfg, loops=12).cache_bytes(4, 256)
  four = Generator(cfg, loops=12, kv_loops=decode.parse_kv_loops("4", 12)).cache_bytes(4, 256)
  first = Generator(cfg, loops=12, kv_loops=decode.parse_kv_loops("first", 12)).cache_bytes(4, 256)
  assert four <= 0.35 * exact and abs(four / exact - 4 / 12) < 1e-3
  assert abs(first / exact - 1 / 12) < 1e-3


@pytest.mark.parametrize("text", ["0", "13", "-1", "x", "1.5"])
def test_bad_kv_loops_are_one_line(text):
  with pytest.raises(ValueError, match=r"--kv_loops=.* is invalid: give a slot count from 1") as e:
    decode.parse_kv_loops(text, 12)
  assert "\n" not in str(e.value) and "'first'" in str(e.value)
