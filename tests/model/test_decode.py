"""Cached decoding (model/decode.py) against recomputing the whole prefix with the
training model: for every variant at K=3, a prompt prefilled in one (padded) pass, then
16 single-token steps, with GQA, a sliding window shorter than the sequence (its ring
buffer wraps several times) and MLA (the cached latent re-expanded each step)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model.decode import CachedDecoder, slot_positions
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.decoding import ATTENTION, LOOPS, VARIANTS, VOCAB, compile_fast, make_cfg
from tests.helpers.models import random_params

B = 2
PROMPT, PADDED, NEW = 7, 8, 16  # 7 real prompt tokens padded to 8, then 16 steps
# ATTENTION's window 4 is shorter than the 23 positions: its ring buffer wraps.


@functools.cache
def case(variant: str, attention: str, prompt: int = PROMPT):
  cfg = make_cfg(variant=variant, **ATTENTION[attention])
  params = random_params(cfg)
  tokens_BxT = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, [B, prompt + NEW]))
  tokens_BxT = tokens_BxT.astype(jnp.int32)
  model = LoopedTransformer(cfg)
  full = compile_fast(lambda p, t: model.apply({"params": p}, t, LOOPS), params, tokens_BxT)
  decoder = CachedDecoder(cfg)

  def cached(params, tokens_BxT):
    """Logits at positions prompt-1 .. prompt+NEW-1: prefill, then teacher-forced steps."""
    cache = decoder.init_cache(LOOPS, B, PADDED + NEW)
    prompt_BxP = jnp.zeros([B, PADDED], jnp.int32).at[:, :prompt].set(tokens_BxT[:, :prompt])
    first_BxV, cache = decoder.prefill(params, prompt_BxP, prompt, cache)

    def body(cache, token_B):
      logits_BxV, cache = decoder.step(params, token_B, cache)
      return cache, logits_BxV

    cache, steps_NxBxV = jax.lax.scan(body, cache, tokens_BxT[:, prompt:].T)
    logits_BxNxV = jnp.concatenate([first_BxV[:, None], jnp.swapaxes(steps_NxBxV, 0, 1)], 1)
    return logits_BxNxV, cache

  run = compile_fast(cached, params, tokens_BxT)
  return cfg, full(params, tokens_BxT), run(params, tokens_BxT)


@pytest.mark.parametrize("attention", ["gqa_window", "mla_window"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_recomputing_the_prefix(variant, attention):
  _, full_BxTxV, (cached_BxNxV, _) = case(variant, attention)
  want = np.asarray(full_BxTxV[:, PROMPT - 1 :])
  assert cached_BxNxV.shape == (B, NEW + 1, VOCAB)
  np.testing.assert_allclose(np.asarray(cached_BxNxV), want, atol=1e-4, rtol=0)
  # the comparison has teeth: the logits move from position to position
  assert np.abs(np.diff(want, axis=1)).max() > 0.1


def test_cached_logits_equal_recomputing_the_prefix_full_attention():
  _, full_BxTxV, (cached_BxNxV, _) = case("FLT", "mha_full")
  np.testing.assert_allclose(
    np.asarray(cached_BxNxV), np.asarray(full_BxTxV[:, PROMPT - 1 :]), atol=1e-4, rtol=0
  )


def test_a_prompt_shorter_than_the_window_starts_a_partly_empty_ring():
  _, full_BxTxV, (cached_BxNxV, _) = case("FLT", "gqa_window", prompt=2)
  np.testing.assert_allclose(
    np.asarray(cached_BxNxV), np.asarray(full_BxTxV[:, 1:]), atol=1e-4, rtol=0
  )


def test_cache_holds_every_loop_and_layer_kv_heads_a_window_ring_and_the_mla_latent():
  cfg, _, (_, cache) = case("FLT", "gqa_window")
  S = PADDED + NEW
  # one full-context layer with S slots, one window layer with a ring of its window (4)
  assert cache.full.k_KxLxBxSxHkvxD.shape == (LOOPS, 1, B, S, cfg.n_kv_head, cfg.head_dim)
  assert cache.window.v_KxLxBxSxHkvxD.shape == (LOOPS, 1, B, 4, cfg.n_kv_head, cfg.head_dim)
  assert int(cache.length) == PROMPT + NEW
  # keys differ per loop: one loop's cache could not stand in for another's
  k = np.asarray(cache.full.k_KxLxBxSxHkvxD)
  assert np.abs(k[0] - k[1]).max() > 0.1 and np.abs(k[1] - k[2]).max() > 0.1
  _, _, (_, mla) = case("FLT", "mla_window")
  assert mla.full.k_KxLxBxSxHkvxD is None
  assert mla.full.c_kv_KxLxBxSxR.shape == (LOOPS, 1, B, S, 16)
  assert mla.window.c_kv_KxLxBxSxR.shape == (LOOPS, 1, B, 4, 16)


def test_slot_positions():
  np.testing.assert_array_equal(slot_positions(2, 5, ring=False), [0, 1, 2, -1, -1])
  # a ring of 4 after position 9: slots hold 8, 9, 6, 7
  np.testing.assert_array_equal(slot_positions(9, 4, ring=True), [8, 9, 6, 7])
  # before the ring is full, unwritten slots are negative
  assert (np.asarray(slot_positions(1, 4, ring=True))[2:] < 0).all()
