"""One block, two modes: Attention.decode and Block.decode against the training
`__call__` (a prompt attends over itself; a new token attends over cache slots, in any
order, with empty slots masked), the variant rules against their table, the decoder's
per-loop body against the training loops' h, and the parameter paths checkpoints use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model import variants
from flt_jax.model.config import ModelConfig, get_config
from flt_jax.model.decode import CachedDecoder
from flt_jax.model.layers import Attention, Block, CacheSlots, rope_tables
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.norm import rms_norm

B, T, D = 2, 8, 32
ATTENTION = {
  "gqa": dict(n_head=4, n_kv_head=2, kv_lora_rank=0),
  "mla": dict(n_head=4, n_kv_head=2, kv_lora_rank=16),
}


def make_cfg(**overrides) -> ModelConfig:
  c = get_config()
  c.update(dict(n_layer=2, d_model=D, vocab_size=70, seq_len=16, loops=3, **overrides))
  return ModelConfig.from_config(c)


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_like(tree, seed=0):
  """Every parameter random (the init's zero c_proj would hide the attention)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), jnp.float32), tree)


def rope(cfg, n):
  cos, sin = rope_tables(cfg.head_dim, n, cfg.rope_base, False)
  return jnp.asarray(cos)[None], jnp.asarray(sin)[None]


def attention_case(attention):
  cfg = make_cfg(**ATTENTION[attention])
  q_in, kv_in = normal(1, B, T, D), normal(2, B, T, D)
  cos, sin = rope(cfg, T)
  attn = Attention(cfg)
  init = attn.init(jax.random.key(0), q_in, kv_in, cos, sin, -1)
  return cfg, attn, random_like(nn.meta.unbox(init)), q_in, kv_in, cos, sin


@pytest.mark.parametrize("attention", ATTENTION)
def test_attention_decode_of_a_prompt_is_the_training_attention(attention):
  cfg, attn, params, q_in, kv_in, cos, sin = attention_case(attention)
  want = attn.apply(params, q_in, kv_in, cos, sin, 3)
  got, entry = attn.apply(params, q_in, kv_in, cos, sin, 3, None, method=Attention.decode)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _, k, v, qkv_entry = attn.apply(params, q_in, kv_in, cos, sin, method=Attention.qkv)
  assert jax.tree.map(jnp.shape, entry) == jax.tree.map(jnp.shape, qkv_entry)
  if cfg.kv_lora_rank:
    assert entry["c_kv"].shape == (B, T, cfg.kv_lora_rank)
  else:  # the cache keeps exactly the keys and values the attention used
    np.testing.assert_array_equal(np.asarray(entry["k"]), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(entry["v"]), np.asarray(v))


@pytest.mark.parametrize("window", [-1, 5])
@pytest.mark.parametrize("attention", ATTENTION)
def test_a_token_over_cache_slots_equals_the_last_row_of_full_attention(attention, window):
  """The last position attends over slots holding the earlier positions' entries (in a
  shuffled order, a window's worth when windowed) plus one empty slot of garbage."""
  cfg, attn, params, q_in, kv_in, cos, sin = attention_case(attention)
  want = attn.apply(params, q_in, kv_in, cos, sin, window)[:, -1:]
  _, _, _, prefix = attn.apply(
    params, q_in[:, :-1], kv_in[:, :-1], cos[:, :-1], sin[:, :-1], method=Attention.qkv
  )
  kept = np.arange(T - 1) if window < 0 else np.arange(T - window, T - 1)
  order = np.random.default_rng(3).permutation(len(kept) + 2)  # + the new token, + empty
  positions_S = jnp.asarray(np.concatenate([kept, [T - 1, -1]])[order], jnp.int32)
  at_S = jnp.maximum(positions_S, 0)

  def store(entry):
    slots = {}
    for name, new in entry.items():
      garbage = jnp.full_like(new, 1e3)
      slots[name] = jnp.concatenate([prefix[name][:, kept], new, garbage], axis=1)[:, order]
    return slots

  slots = CacheSlots(store, positions_S, cos[:, at_S], sin[:, at_S])
  got, entry = attn.apply(
    params,
    q_in[:, -1:],
    kv_in[:, -1:],
    cos[:, -1:],
    sin[:, -1:],
    window,
    slots,
    method=Attention.decode,
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert float(jnp.abs(want).max()) > 0.1
  assert all(a.shape[1] == 1 for a in entry.values())


@pytest.mark.parametrize("variant", ["FLT", "FLT_res", "LT_ia", "LT"])
@pytest.mark.parametrize("inject", [False, True])
def test_block_decode_of_a_prompt_is_the_training_block(variant, inject):
  cfg = make_cfg(variant=variant, **ATTENTION["gqa"])
  x, h = normal(4, B, T, D), normal(5, B, T, D)
  cos, sin = rope(cfg, T)
  args = (x, h, rms_norm(h), jnp.array(inject), jnp.array(inject), cos, sin, jnp.int32(-1))
  block = Block(cfg)
  params = random_like(nn.meta.unbox(block.init(jax.random.key(0), *args)))
  want = block.apply(params, *args)
  got, entry = block.apply(params, *args, None, method=Block.decode)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert set(entry) == {"k", "v"}
  if inject and variant != "LT":  # the flag reaches the block: h changes its output
    plain = block.apply(params, *args[:3], jnp.array(False), jnp.array(False), *args[5:])
    assert float(jnp.abs(want - plain).max()) > 1e-3


def test_variant_rules_follow_the_table():
  x0, h = normal(6, B, T, D), normal(7, B, T, D)
  x0_normed, yes, no = rms_norm(x0), jnp.array(True), jnp.array(False)

  def loop_input(variant, has_h):
    return np.asarray(variants.loop_input(variant, h, x0, x0_normed, has_h))

  np.testing.assert_array_equal(loop_input("LT", yes), np.asarray(h))
  np.testing.assert_array_equal(loop_input("LT_i", no), np.asarray(x0_normed))
  np.testing.assert_allclose(loop_input("LT_i", yes), np.asarray(rms_norm(x0 + h)), atol=1e-6)
  for variant in ("LT_ia", "FLT_res", "FLT"):
    np.testing.assert_array_equal(loop_input(variant, yes), np.asarray(x0_normed))
  for variant in ("FLT", "LT_ia"):
    np.testing.assert_allclose(variants.query_source(variant, h), rms_norm(h), atol=1e-6)
  assert variants.query_source("LT", h) is h
  injects = {
    v: [bool(variants.injects_query(v, yes, layer)) for layer in range(3)] for v in ("FLT", "LT_ia")
  }
  assert injects == {"FLT": [True] * 3, "LT_ia": [True, False, False]}
  assert not any(bool(variants.injects_query(v, no, 0)) for v in ("FLT", "LT_ia"))
  np.testing.assert_allclose(
    variants.block_input("FLT_res", x0, h, yes), rms_norm(x0 + h), atol=1e-6
  )
  np.testing.assert_array_equal(variants.block_input("FLT_res", x0, h, no), x0)
  assert variants.block_input("FLT", x0, h, yes) is x0
  np.testing.assert_array_equal(variants.attention_query("FLT", x0, h, yes), h)
  np.testing.assert_array_equal(variants.attention_query("FLT", x0, h, no), x0)
  assert variants.attention_query("FLT_res", x0, h, yes) is x0


@pytest.mark.parametrize("variant", ["FLT", "LT_i", "FLT_res"])
def test_the_decoders_loop_body_gives_each_loops_h_of_the_training_model(variant):
  """CachedDecoder.loop called one loop at a time (a prompt) reproduces the h that the
  training scan emits after every loop."""
  cfg = make_cfg(variant=variant, window_pattern="SL", **ATTENTION["gqa"])
  model = LoopedTransformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, 70, [B, T]), jnp.int32)
  params = random_like(nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"]))
  h_KxBxTxD, _ = model.apply({"params": params}, tokens, 3, True, method=model.hidden_states)
  decoder = CachedDecoder(cfg)
  cache = decoder.init_cache(3, B, T)
  cos, sin = rope(cfg, T)

  def put(cache_KxLxBxSx, entry_BxTx, loop_index, layer_in_group, group):
    ring = cache_KxLxBxSx.shape[3]  # keep the prompt's last `ring` positions
    return cache_KxLxBxSx.at[loop_index, layer_in_group].set(entry_BxTx[:, T - ring :])

  tokens_in = decoder.new_tokens(params, tokens, cos, sin, put)
  h, groups = tokens_in.x0_normed, {"full": cache.full, "window": cache.window}
  for k in range(3):
    h, groups = decoder.loop(tokens_in, h, groups, jnp.int32(k))
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_KxBxTxD[k]), atol=1e-5, rtol=0)
  # every loop wrote its own keys: loop 0's and loop 2's differ
  k_full = np.asarray(groups["full"].k_KxLxBxSxHkvxD)
  assert np.abs(k_full[0] - k_full[2]).max() > 0.1


@pytest.mark.parametrize("attention", ATTENTION)
def test_parameter_paths_are_the_checkpoints(attention):
  cfg = make_cfg(**ATTENTION[attention])
  model = LoopedTransformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros([1, 8], jnp.int32))
  paths = {
    "/".join(str(k.key) for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes["params"]))
  }
  projections = ["c_kv_down", "c_k_up", "c_v_up"] if cfg.kv_lora_rank else ["c_k", "c_v"]
  block = "blocks/layers/block"
  assert paths == {
    "wte/embedding",
    "lm_head/kernel",
    f"{block}/mlp/c_fc/kernel",
    f"{block}/mlp/c_proj/kernel",
    *(f"{block}/attn/{name}/kernel" for name in ["c_q", *projections, "c_proj"]),
  }
