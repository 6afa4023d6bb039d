"""The tiny decoding setups that the cached-decode, exit and generation tests share: every
variant, three attention layouts (a sliding window shorter than the sequence, MLA, full
context) at K=3."""

from __future__ import annotations

import jax

from flt_jax.model.config import ModelConfig
from tests.helpers.models import model_config

VARIANTS = ("FLT", "FLT_res", "LT", "LT_i", "LT_ia")
LOOPS, VOCAB = 3, 70
BASE = dict(n_layer=2, d_model=32, vocab_size=VOCAB, seq_len=16, loops=LOOPS, kv_lora_rank=0)
ATTENTION = {
  # layer 0 has the window seq_len // 4 = 4, layer 1 full context
  "gqa_window": dict(n_head=4, n_kv_head=2, window_pattern="SL"),
  "mla_window": dict(n_head=4, n_kv_head=2, window_pattern="SL", kv_lora_rank=16),
  "mha_full": dict(n_head=2, n_kv_head=2, window_pattern="L"),
}


def make_cfg(**overrides) -> ModelConfig:
  return model_config(**{**BASE, **overrides})


def compile_fast(fn, *args):
  """Compiled once, ahead of the calls (cheaply: tests/conftest.py's XLA flags)."""
  return jax.jit(fn).lower(*args).compile()
