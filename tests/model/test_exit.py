"""Per-token exit (model/exit.py, CachedDecoder.forward_exit / step_exit): the
criterion:threshold parser and its one-line errors; each criterion's measure against
numpy; threshold 0 never fires and reproduces the fixed-K forward for every variant; the
teacher-forced pass equals decoding the tokens one at a time, and a token whose earlier
tokens all ran at least its loops gets the fixed-K' logits at its exit loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model import exit as exit_lib
from flt_jax.model.decode import CachedDecoder
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.decoding import ATTENTION, VARIANTS, compile_fast, make_cfg
from tests.helpers.models import random_params

K, B, T, VOCAB = 4, 2, 10, 70


def test_parse_criterion_and_threshold():
  rule = exit_lib.parse_exit("kl:5e-4", min_loops=2, max_loops=12)
  assert rule == exit_lib.ExitRule("kl", 5e-4, 2, 12)
  assert rule.label == "kl:0.0005" and rule.reads_head
  stable = exit_lib.parse_exit(" argmax_stable:3 ", max_loops=12)
  assert (stable.criterion, stable.threshold, stable.label) == (
    "argmax_stable",
    3.0,
    "argmax_stable:3",
  )
  rules = exit_lib.parse_exit_list(
    "latent_diff:0.01,latent_diff:0.03,kl:0", flag="--eval_exit", max_loops=0
  )
  assert [r.label for r in rules] == ["latent_diff:0.01", "latent_diff:0.03", "kl:0"]
  assert not rules[0].reads_head and rules[0].max_loops == 0
  assert exit_lib.with_max_loops(rules[0], 12).max_loops == 12


@pytest.mark.parametrize(
  "text, why",
  [
    ("entropy:0.1", "unknown criterion 'entropy'"),
    ("kl", "kl needs a threshold"),
    ("kl:", "kl needs a threshold"),
    ("kl:abc", "the threshold 'abc' is not a number"),
    ("kl:-1", "finite number >= 0"),
    ("latent_diff:inf", "finite number >= 0"),
    ("argmax_stable:2.5", "whole number"),
  ],
)
def test_bad_rules_are_one_line_naming_the_flag_and_the_fix(text, why):
  with pytest.raises(ValueError, match=why) as e:
    exit_lib.parse_exit(text, flag="--exit", max_loops=12)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"--exit={text} is invalid")
  assert "e.g. latent_diff:0.03, kl:5e-4 or argmax_stable:3" in message


def test_loop_bounds_are_checked():
  with pytest.raises(ValueError, match="--min_loops=0 is invalid"):
    exit_lib.parse_exit("kl:1e-3", min_loops=0, max_loops=12)
  with pytest.raises(ValueError, match="max_loops=3 is below min_loops=4"):
    exit_lib.parse_exit("kl:1e-3", min_loops=4, max_loops=3)
  with pytest.raises(ValueError, match="max_loops=2 is below min_loops=3"):
    exit_lib.with_max_loops(exit_lib.ExitRule("kl", 1e-3, 3, 0), 2)


def _run_criterion(rule, h_KxBxTxD, logits_KxBxTxV=None):
  """after_loop over given per-loop h (and logits), as the pass calls it."""
  logits = None if logits_KxBxTxV is None else iter(jnp.asarray(logits_KxBxTxV))
  state = exit_lib.start(rule, *h_KxBxTxD.shape[1:3], VOCAB)
  h_before = jnp.zeros_like(h_KxBxTxD[0])
  for i, h in enumerate(jnp.asarray(h_KxBxTxD)):
    fn = None if logits is None else (lambda _, step=next(logits): step)
    state = exit_lib.after_loop(rule, state, jnp.int32(i), h_before, h, fn, rule.threshold)
    h_before = h
  return np.asarray(state.loops_BxT)


def test_latent_diff_exits_at_the_first_loop_whose_relative_change_is_below_the_threshold():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(6, 3, 5, 8)).astype(np.float32)
  # shrinking steps: h_i = h_{i-1} + d_i with |d_i| decaying differently per token
  for i in range(1, 6):
    h[i] = h[i - 1] + rng.normal(size=(3, 5, 8)) * np.exp(-i * rng.uniform(0.5, 2.0, (3, 5, 1)))
  rel = np.linalg.norm(h[1:] - h[:-1], axis=-1) / np.linalg.norm(h[:-1], axis=-1)  # [5, B, T]
  for threshold, min_loops in ((0.05, 1), (0.2, 1), (0.2, 4)):
    rule = exit_lib.ExitRule("latent_diff", threshold, min_loops, 6)
    want = np.full((3, 5), 6)
    for b in range(3):
      for t in range(5):
        for i in range(1, 6):  # after loop i (i + 1 loops run)
          if rel[i - 1, b, t] < threshold and i + 1 >= min_loops:
            want[b, t] = i + 1
            break
    assert (_run_criterion(rule, h) == want).all()
    assert len(np.unique(want)) > 1  # the tokens exit at different loops


def test_kl_and_argmax_stable_read_the_head():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 2, 4, VOCAB)).astype(np.float32) * 3
  logits[3:] = logits[2] + rng.normal(size=(3, 2, 4, VOCAB)) * 0.01  # settles after loop 2
  logits[1, 0, 0] = logits[0, 0, 0]  # one token's distribution does not move at loop 1
  h = np.zeros((6, 2, 4, 8), np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  kl = (np.exp(logp[1:]) * (logp[1:] - logp[:-1])).sum(-1)  # [5, B, T]
  for min_loops in (1, 3):
    rule = exit_lib.ExitRule("kl", 1e-3, min_loops, 6)
    fired_KxBxT = (kl < 1e-3) & (np.arange(2, 7)[:, None, None] >= min_loops)
    want = np.where(fired_KxBxT.any(0), fired_KxBxT.argmax(0) + 2, 6)
    assert (_run_criterion(rule, h, logits) == want).all()
    assert want[0, 0] == (2 if min_loops == 1 else 4) and (want[:, 1:] == 4).all()
  top = logits.argmax(-1)
  for n in (1, 2, 3):
    rule = exit_lib.ExitRule("argmax_stable", n, 1, 6)
    want = np.full((2, 4), 6)
    for b in range(2):
      for t in range(4):
        for i in range(6):
          if i + 1 >= n and (top[i - n + 1 : i + 1, b, t] == top[i, b, t]).all():
            want[b, t] = i + 1
            break
    assert (_run_criterion(rule, h, logits) == want).all()


def test_threshold_zero_never_fires_even_when_nothing_moves():
  h = np.ones((5, 1, 3, 8), np.float32)  # h does not change at all: every measure is 0
  logits = np.zeros((5, 1, 3, VOCAB), np.float32)
  for criterion in exit_lib.CRITERIA:
    rule = exit_lib.ExitRule(criterion, 0.0, 1, 5)
    assert (_run_criterion(rule, h, logits) == 5).all()
    fires = exit_lib.ExitRule(criterion, 1e-6 if criterion != "argmax_stable" else 2, 1, 5)
    assert (_run_criterion(fires, h, logits) == 2).all()


@functools.cache
def case(variant: str, attention: str = "gqa_window"):
  cfg = make_cfg(variant=variant, loops=K, **ATTENTION[attention])
  params = random_params(cfg)
  tokens_BxT = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, [B, T]), jnp.int32)
  return cfg, params, tokens_BxT


def _forward(cfg, params, tokens_BxT, loops):
  model = LoopedTransformer(cfg)
  return compile_fast(lambda p, t: model.apply({"params": p}, t, loops), params, tokens_BxT)(
    params, tokens_BxT
  )


def _forward_exit(cfg, params, tokens_BxT, rule):
  decoder = CachedDecoder(cfg)

  def run(params, tokens_BxT):
    h_BxTxD, exits = decoder.forward_exit(params, tokens_BxT, rule)
    return decoder.logits(params, h_BxTxD), exits

  return compile_fast(run, params, tokens_BxT)(params, tokens_BxT)


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_zero_is_the_fixed_k_forward(variant):
  cfg, params, tokens_BxT = case(variant)
  rule = exit_lib.ExitRule("latent_diff", 0.0, 1, K)
  logits_BxTxV, exits = _forward_exit(cfg, params, tokens_BxT, rule)
  np.testing.assert_allclose(logits_BxTxV, _forward(cfg, params, tokens_BxT, K), atol=2e-5, rtol=0)
  assert int(exits.loops_run) == K and (np.asarray(exits.exit_loops_BxT) == K).all()


@pytest.mark.parametrize(
  "variant, attention, rule",
  [
    ("FLT", "gqa_window", exit_lib.ExitRule("latent_diff", 0.5, 1, K)),
    ("LT_ia", "mla_window", exit_lib.ExitRule("kl", 1e-2, 1, K)),
    ("FLT_res", "gqa_window", exit_lib.ExitRule("argmax_stable", 2, 1, K)),
  ],
)
def test_teacher_forced_exit_equals_decoding_one_token_at_a_time(variant, attention, rule):
  """Both apply the rule: an exited token's later keys/values are its last computed
  loop's. Side by side they come from the in-pass blend, one at a time from the cache
  slots written for the loops a step did not run."""
  cfg, params, tokens_BxT = case(variant, attention)
  logits_BxTxV, exits = _forward_exit(cfg, params, tokens_BxT, rule)
  decoder = CachedDecoder(cfg)

  def one_at_a_time(params, tokens_BxT):
    cache = decoder.init_cache(K, B, T)

    def body(cache, token_B):
      logits_BxV, cache, step = decoder.step_exit(params, token_B, cache, rule)
      return cache, (logits_BxV, step.exit_loops_BxT[:, 0], step.loops_run)

    _, (logits_TxBxV, exit_TxB, loops_T) = jax.lax.scan(body, cache, tokens_BxT.T)
    return jnp.swapaxes(logits_TxBxV, 0, 1), exit_TxB.T, loops_T

  step_logits, step_exits, loops_T = compile_fast(one_at_a_time, params, tokens_BxT)(
    params, tokens_BxT
  )
  exit_BxT = np.asarray(exits.exit_loops_BxT)
  assert (np.asarray(step_exits) == exit_BxT).all()
  assert len(np.unique(exit_BxT)) > 1  # tokens exit at different loops
  np.testing.assert_allclose(step_logits, logits_BxTxV, atol=2e-5, rtol=0)
  # a step runs its batch's slowest row; the side-by-side pass its slowest token
  assert (np.asarray(loops_T) == exit_BxT.max(0)).all()
  assert int(exits.loops_run) == exit_BxT.max()


def test_an_exited_token_is_frozen_at_its_exit_loop():
  """Position 0 attends only to itself, and a token whose earlier tokens all ran at
  least its loops saw every one of them live: both get the fixed-K' logits at K' = their
  exit loop. The others read frozen keys/values and may differ."""
  cfg, params, tokens_BxT = case("FLT")
  rule = exit_lib.ExitRule("latent_diff", 0.5, 1, K)
  logits_BxTxV, exits = _forward_exit(cfg, params, tokens_BxT, rule)
  exit_BxT = np.asarray(exits.exit_loops_BxT)
  fixed = {k: np.asarray(_forward(cfg, params, tokens_BxT, k)) for k in np.unique(exit_BxT)}
  checked = 0
  for b in range(B):
    for t in range(T):
      e = exit_BxT[b, t]
      if (exit_BxT[b, :t] >= e).all():
        np.testing.assert_allclose(logits_BxTxV[b, t], fixed[e][b, t], atol=2e-5, rtol=0)
        checked += 1
  assert checked >= B and checked < B * T
