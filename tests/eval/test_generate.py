"""Cached generation (eval/generate.py): greedy equals argmax by full recomputation,
seeded sampling, the stop token ends the while_loop early, streaming sees every token,
and requests longer than the rotary table are refused."""

import functools

import jax
import numpy as np
import pytest

from flt_jax.eval.generate import Generator, padded_length
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.models import model_config, random_params

LOOPS = 3
VOCAB = 70
NEW = 12
PROMPTS = [[5, 9, 3, 22, 1], [40, 2, 2, 17, 8]]


@functools.cache
def setup(variant="LT_ia"):
  # GQA, a window of 4 on layer 0 (shorter than prompt + NEW), full context on layer 1
  cfg = model_config(
    variant=variant,
    n_layer=2,
    d_model=32,
    vocab_size=VOCAB,
    seq_len=16,
    loops=LOOPS,
    kv_lora_rank=0,
    n_head=4,
    n_kv_head=2,
    window_pattern="SL",
  )
  params = random_params(cfg)
  model = LoopedTransformer(cfg)
  return cfg, params, jax.jit(lambda p, t: model.apply({"params": p}, t, LOOPS))


def recomputed_greedy(prompt, n, variant="LT_ia"):
  """argmax decoding, the whole prefix recomputed per token (right-padded: causal)."""
  _, params, forward = setup(variant)
  tokens = list(prompt)
  for _ in range(n):
    buf = np.zeros([1, 32], np.int32)
    buf[0, : len(tokens)] = tokens
    tokens.append(int(np.argmax(forward(params, buf)[0, len(tokens) - 1])))
  return tokens[len(prompt) :]


@pytest.mark.parametrize("variant", ["LT_ia", "FLT"])
def test_greedy_generation_equals_argmax_by_recomputation(variant):
  cfg, params, _ = setup(variant)
  rows = Generator(cfg, loops=LOOPS)(params, PROMPTS, NEW)
  want = [recomputed_greedy(p, NEW, variant) for p in PROMPTS]
  assert rows == want
  assert rows[0] != rows[1]


def test_sampling_is_seeded():
  cfg, params, _ = setup()
  sampler = Generator(cfg, loops=LOOPS, temperature=1.0, top_p=0.9)
  first = sampler(params, PROMPTS[0], NEW, seed=1)
  assert sampler(params, PROMPTS[0], NEW, seed=1) == first
  others = [sampler(params, PROMPTS[0], NEW, seed=s) for s in (2, 3)]
  assert any(o != first for o in others)


def test_top_k_one_is_greedy():
  cfg, params, _ = setup()
  top1 = Generator(cfg, loops=LOOPS, temperature=1.0, top_k=1)(params, PROMPTS[0], NEW, seed=5)
  assert top1 == [recomputed_greedy(PROMPTS[0], NEW)]


def test_stop_token_ends_generation_and_streaming_sees_each_token():
  cfg, params, _ = setup()
  greedy = recomputed_greedy(PROMPTS[0], NEW)
  stop = greedy[3]
  cut = greedy.index(stop) + 1  # the first occurrence ends the row, stop token included
  seen = []
  generator = Generator(cfg, loops=LOOPS, stop_token=stop)
  rows = generator(params, PROMPTS[0], NEW, on_token=lambda i, t: seen.append((i, t.tolist())))
  assert rows == [greedy[:cut]]
  # the while_loop stopped there: no step ran after the stop token
  assert seen == [(i, [t]) for i, t in enumerate(greedy[:cut])]


def test_a_finished_row_waits_for_the_others():
  cfg, params, _ = setup()
  greedy = [recomputed_greedy(p, NEW) for p in PROMPTS]
  stop = greedy[0][1]
  rows = Generator(cfg, loops=LOOPS, stop_token=stop)(params, PROMPTS, NEW)
  for row, want in zip(rows, greedy):
    assert row == (want[: want.index(stop) + 1] if stop in want else want)


def test_requests_beyond_the_rotary_table_are_refused():
  cfg, params, _ = setup()  # seq_len 16: a table of 160 positions
  generator = Generator(cfg, loops=LOOPS)
  with pytest.raises(ValueError, match=r"needs 164 positions, more than the rotary table's 160"):
    generator(params, list(range(5)), 160)
  with pytest.raises(ValueError, match="--max_new_tokens=0 is invalid"):
    generator(params, PROMPTS[0], 0)
  with pytest.raises(ValueError, match="--top_p=0.0 is invalid"):
    Generator(cfg, loops=LOOPS, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match=f"--stop_token={VOCAB} is outside the vocabulary"):
    Generator(cfg, loops=LOOPS, stop_token=VOCAB)
  assert padded_length(5) == 16 and padded_length(17) == 32
