"""Exact cached decoding for every looped variant: a key/value cache with one entry per
(loop, layer).

A looped model's keys and values differ per loop (loop k's stream, hence its keys, depends
on h(k-1)), so an exact cache keeps every loop's: the new token runs its K loops in order,
and at loop k, layer l it attends over the keys/values that loop k, layer l produced for
the earlier tokens. (The official implementation keeps only the last loop's, which is an
approximation for K > 1.)

The cache is an explicit pytree (`DecodeCache`), not a Flax 'cache' collection, because
it threads through two levels of loops (the K loops and the L layers) whose cache shapes
differ per layer (full-context layers keep every position, sliding-window layers a ring of
their window) and a jax.lax.while_loop around them; a pytree makes its shapes, its
donation and its in-place updates explicit.

  full layers     [K, L_full, B, S, ...]    slot s holds position s
  window layers   [K, L_win, B, R, ...]     ring buffer, R = min(window, S) slots; slot j
                                            holds the latest position p with p % R == j
  per slot        standard/GQA: k (after RoPE and the key norm) and v, Hkv heads each;
                  MLA: the latent norm(c_kv_down(x)) [r], re-expanded by c_k_up/c_v_up
                  (RoPE at the slot's position, then the key norm) at every step

`CachedDecoder` runs on the params of `LoopedTransformer` unchanged: the embedding and the
head through the model's own modules, the blocks through `_CachedBlock`, whose submodules
carry the training block's names (attn/c_q, ..., mlp reuses layers.MLP) and which is
applied to one layer's slice of the stacked params. Its math mirrors `layers.Block` and
`looped._Loop` (tests/model/test_decode.py checks the logits against the training model
for every variant). The training path is untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flt_jax.model import attention
from flt_jax.model.config import ModelConfig
from flt_jax.model.layers import MLP, apply_rope, dense, rms_norm, rope_tables, uniform_init
from flt_jax.model.looped import LoopedTransformer


class GroupCache(NamedTuple):
  """The cache of one group of layers (full context, or one sliding window).

  Standard/GQA attention fills k and v, MLA fills c_kv; the other fields are None.
  S is the group's slot count (the max length, or the ring size R for a window).
  """

  k_KxLxBxSxHkvxD: jax.Array | None = None
  v_KxLxBxSxHkvxD: jax.Array | None = None
  c_kv_KxLxBxSxR: jax.Array | None = None  # R here is the MLA rank (kv_lora_rank)


class DecodeCache(NamedTuple):
  """Keys/values of every (loop, layer) for the tokens decoded so far.

  length is the number of positions written, i.e. the position of the next token.
  A group without layers is None.
  """

  full: GroupCache | None
  window: GroupCache | None
  length: jax.Array  # int32 []


def slot_positions(position, slots: int, ring: bool):
  """[slots] int32: the position each slot holds once `position` is written (negative:
  never written). A full cache's slot s holds position s; a ring's slot j the latest
  p <= position with p % slots == j."""
  j_S = jnp.arange(slots, dtype=jnp.int32)
  if not ring:
    return jnp.where(j_S <= position, j_S, -1)
  return position - jnp.mod(position - j_S, slots)


class _CachedAttention(nn.Module):
  """layers.Attention (same parameter names) that reads and writes a cache.

  Prefill (`step` None): attends over its own T tokens as training does and returns the
  entries to cache ([B, T, ...]). Step (T = 1, `step` = (read_entries, positions_S)):
  `read_entries(entry)` writes the new token's entry into this (loop, layer)'s slots and
  returns them; the query attends over the slots whose position is >= 0.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, q_in_BxTxD, kv_in_BxTxD, rope, window_left: int, step=None):
    cfg = self.cfg
    B, T, _ = q_in_BxTxD.shape
    H, Hkv, hd, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    compute = jnp.dtype(cfg.dtype)
    cos_1xTxD2, sin_1xTxD2, table_cos, table_sin = rope
    q = dense(H * hd, ("embed", "heads"), uniform_init(D), cfg, "c_q")(q_in_BxTxD)
    q_BxTxHxD = rms_norm(apply_rope(q.reshape(B, T, H, hd), cos_1xTxD2, sin_1xTxD2))
    q_BxTxHxD = q_BxTxHxD.astype(compute)
    if cfg.kv_lora_rank:
      r = cfg.kv_lora_rank
      down = dense(r, ("embed", "kv_lora"), uniform_init(D), cfg, "c_kv_down")
      k_up = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_k_up")
      v_up = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_v_up")
      c_kv_BxTxR = rms_norm(down(kv_in_BxTxD))
      entry = {"c_kv": c_kv_BxTxR}

      def expand(c_kv_BxSxR, cos, sin):
        S = c_kv_BxSxR.shape[1]
        k = rms_norm(apply_rope(k_up(c_kv_BxSxR).reshape(B, S, Hkv, hd), cos, sin))
        return k.astype(compute), v_up(c_kv_BxSxR).reshape(B, S, Hkv, hd).astype(compute)
    else:
      k = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_k")(kv_in_BxTxD)
      v = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_v")(kv_in_BxTxD)
      k_BxTxHkvxD = rms_norm(apply_rope(k.reshape(B, T, Hkv, hd), cos_1xTxD2, sin_1xTxD2))
      entry = {
        "k": k_BxTxHkvxD.astype(compute),
        "v": v.reshape(B, T, Hkv, hd).astype(compute),
      }
    if step is None:  # prefill: the training computation on the prompt
      if cfg.kv_lora_rank:
        k_BxTxHkvxD, v_BxTxHkvxD = expand(c_kv_BxTxR, cos_1xTxD2, sin_1xTxD2)
      else:
        k_BxTxHkvxD, v_BxTxHkvxD = entry["k"], entry["v"]
      y_BxTxHxD = attention.attend(
        q_BxTxHxD,
        k_BxTxHkvxD,
        v_BxTxHkvxD,
        window_left=window_left,
        impl=cfg.attention_impl,
        options=cfg.attention_options,
      )
    else:
      read_entries, positions_S = step
      slots = read_entries(entry)  # the group's slots of this (loop, layer), entry written
      if cfg.kv_lora_rank:
        at = jnp.maximum(positions_S, 0)
        k_BxSxHkvxD, v_BxSxHkvxD = expand(slots["c_kv"], table_cos[at][None], table_sin[at][None])
      else:
        k_BxSxHkvxD, v_BxSxHkvxD = slots["k"], slots["v"]
      visible_BxTxS = jnp.broadcast_to(positions_S >= 0, (B, T, positions_S.shape[0]))
      y_BxTxHxD = attention.masked_attention(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, visible_BxTxS)
    out = dense(D, ("heads", "embed"), nn.initializers.zeros, cfg, "c_proj")(
      y_BxTxHxD.reshape(B, T, H * hd)
    )
    return out, entry


class _CachedBlock(nn.Module):
  """layers.Block with the cached attention (same submodule names: attn, mlp)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, h_BxTxD, h_query_BxTxD, inject_query, has_h, rope, window, step):
    if self.cfg.variant == "FLT_res":
      x_BxTxD = jnp.where(has_h, rms_norm(x_BxTxD + h_BxTxD), x_BxTxD)
    x_normed = rms_norm(x_BxTxD)
    q_in = x_normed
    if self.cfg.variant in ("FLT", "LT_ia"):
      q_in = jnp.where(inject_query, h_query_BxTxD, x_normed)
    attn_out, entry = _CachedAttention(self.cfg, name="attn")(q_in, x_normed, rope, window, step)
    x_BxTxD = x_BxTxD + attn_out
    x_BxTxD = x_BxTxD + MLP(self.cfg, name="mlp")(x_BxTxD)
    return x_BxTxD, entry


def _entry_names(cfg: ModelConfig) -> tuple[str, ...]:
  return ("c_kv",) if cfg.kv_lora_rank else ("k", "v")


_FIELD = {"k": "k_KxLxBxSxHkvxD", "v": "v_KxLxBxSxHkvxD", "c_kv": "c_kv_KxLxBxSxR"}


def _get(group: GroupCache, name: str):
  return getattr(group, _FIELD[name])


def _set(group: GroupCache, name: str, value) -> GroupCache:
  return group._replace(**{_FIELD[name]: value})


def _write(cache_KxLxBxSx, entry_BxTx, loop_index, layer_in_group: int, slot):
  """cache[loop, layer, :, slot : slot + T] = entry, in place."""
  start = (loop_index, layer_in_group, 0, slot) + (0,) * (entry_BxTx.ndim - 2)
  return jax.lax.dynamic_update_slice(cache_KxLxBxSx, entry_BxTx[None, None], start)


class CachedDecoder:
  """Prefill and single-token steps of a LoopedTransformer's params with a DecodeCache.

    decoder = CachedDecoder(model_cfg)
    cache = decoder.init_cache(loops=12, batch=1, max_len=256)
    logits_BxV, cache = decoder.prefill(params, prompt_BxT, prompt_len, cache)
    logits_BxV, cache = decoder.step(params, next_token_B, cache)   # at cache.length

  The loop count is the cache's leading axis. Pure functions of their arguments, usable
  under jax.jit and inside jax.lax loops.
  """

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.model = LoopedTransformer(cfg)
    windows = cfg.window_sizes
    self.window = max(windows)  # the one sliding window (cfg.window_sizes has at most one)
    # layer -> (group, index within the group); a group's layers keep their order
    self._layer_group = []
    counts = {"full": 0, "window": 0}
    for w in windows:
      group = "full" if w < 0 else "window"
      self._layer_group.append((group, counts[group]))
      counts[group] += 1
    self._group_layers = counts
    if len({w for w in windows if w >= 0}) > 1:
      raise ValueError(f"decoding supports one sliding window size, got {sorted(set(windows))}")

  # -- the cache

  def ring_size(self, max_len: int) -> int:
    return min(self.window, max_len) if self.window > 0 else 0

  def init_cache(self, loops: int, batch: int, max_len: int) -> DecodeCache:
    """An empty cache for `loops` loops, `batch` rows and positions 0..max_len-1."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)

    def group(n_layers: int, slots: int) -> GroupCache | None:
      if not n_layers:
        return None
      lead = (loops, n_layers, batch, slots)
      if cfg.kv_lora_rank:
        return GroupCache(c_kv_KxLxBxSxR=jnp.zeros(lead + (cfg.kv_lora_rank,), dtype))
      shape = lead + (cfg.n_kv_head, cfg.head_dim)
      return GroupCache(
        k_KxLxBxSxHkvxD=jnp.zeros(shape, dtype), v_KxLxBxSxHkvxD=jnp.zeros(shape, dtype)
      )

    return DecodeCache(
      full=group(self._group_layers["full"], max_len),
      window=group(self._group_layers["window"], self.ring_size(max_len)),
      length=jnp.zeros([], jnp.int32),
    )

  def _rope(self, max_len: int):
    cfg = self.cfg
    cos, sin = rope_tables(
      cfg.head_dim, max(cfg.rope_table_len, max_len), cfg.rope_base, cfg.rope_bf16
    )
    return jnp.asarray(cos), jnp.asarray(sin)

  # -- the two passes

  def prefill(self, params, tokens_BxT, length, cache: DecodeCache):
    """Runs the prompt tokens_BxT (its first `length` tokens real, the rest padding that
    later steps overwrite) at positions 0..T-1 in one pass, fills the cache and returns
    the logits [B, V] at position length - 1. `cache` must be empty (length 0)."""
    T = tokens_BxT.shape[1]
    loops, _, max_len = self._dims(cache)
    if max_len < T:
      raise ValueError(f"the padded prompt ({T} tokens) does not fit the cache ({max_len})")
    table_cos, table_sin = self._rope(max_len)
    rope = (table_cos[:T][None], table_sin[:T][None], table_cos, table_sin)
    length = jnp.asarray(length, jnp.int32)
    ring = self.ring_size(max_len)
    # The ring's slot j takes the prompt's last position p < length with p % ring == j.
    ring_positions_R = slot_positions(length - 1, ring, ring=True) if ring else None

    def store(group: GroupCache, name, entry_BxTx, loop_index, index, kind):
      if kind == "full":
        return _set(group, name, _write(_get(group, name), entry_BxTx, loop_index, index, 0))
      take_R = jnp.clip(ring_positions_R, 0, T - 1)
      ring_BxRx = jnp.take(entry_BxTx, take_R, axis=1)
      return _set(group, name, _write(_get(group, name), ring_BxRx, loop_index, index, 0))

    h_BxTxD, cache = self._loops(params, tokens_BxT, rope, cache, loops, store, step=None)
    last_BxD = jnp.take(h_BxTxD, length - 1, axis=1)
    return self._logits(params, last_BxD), cache._replace(length=length)

  def step(self, params, tokens_B, cache: DecodeCache):
    """Feeds one token per row at position cache.length; returns the logits [B, V] of
    the next one and the cache with this token's keys/values of every (loop, layer)."""
    loops, _, max_len = self._dims(cache)
    position = cache.length
    table_cos, table_sin = self._rope(max_len)
    rope = (
      jax.lax.dynamic_slice_in_dim(table_cos, position, 1)[None],
      jax.lax.dynamic_slice_in_dim(table_sin, position, 1)[None],
      table_cos,
      table_sin,
    )
    ring = self.ring_size(max_len)

    def store(group: GroupCache, name, entry_Bx1x, loop_index, index, kind):
      slot = position if kind == "full" else jnp.mod(position, ring)
      return _set(group, name, _write(_get(group, name), entry_Bx1x, loop_index, index, slot))

    positions = {"full": slot_positions(position, max_len, ring=False)}
    if ring:
      positions["window"] = slot_positions(position, ring, ring=True)
    h_BxTxD, cache = self._loops(
      params, tokens_B[:, None], rope, cache, loops, store, step=positions
    )
    return self._logits(params, h_BxTxD[:, 0]), cache._replace(length=position + 1)

  # -- internals

  def _dims(self, cache: DecodeCache):
    """(loops, batch, max_len) of a cache (the last layer is always full context)."""
    leaf = next(a for a in cache.full if a is not None)
    return leaf.shape[0], leaf.shape[2], leaf.shape[3]

  def _logits(self, params, h_BxD):
    return self.model.apply({"params": params}, h_BxD, method=LoopedTransformer.logits)

  def _loops(self, params, tokens_BxT, rope, cache: DecodeCache, loops: int, store, step):
    """The K loops of _Loop over the new tokens, each layer reading/writing the cache."""
    cfg, variant = self.cfg, self.cfg.variant
    params = nn.meta.unbox(params)
    x0 = self.model.apply({"params": params}, tokens_BxT, method=_embed).astype(jnp.float32)
    x0_normed = rms_norm(x0)
    stacked = params["blocks"]["layers"]["block"]
    layer_params = [jax.tree.map(lambda a, l=l: a[l], stacked) for l in range(cfg.n_layer)]
    block = _CachedBlock(cfg)
    windows = cfg.window_sizes

    def loop_body(carry, loop_index):
      h_BxTxD, groups = carry
      has_h = loop_index > 0
      if variant == "LT":
        x_BxTxD = h_BxTxD
      elif variant == "LT_i":
        x_BxTxD = jnp.where(has_h, rms_norm(x0 + h_BxTxD), x0_normed)
      else:
        x_BxTxD = x0_normed
      h_query = rms_norm(h_BxTxD) if variant in ("FLT", "LT_ia") else h_BxTxD
      for l in range(cfg.n_layer):
        kind, index = self._layer_group[l]
        inject_query = has_h & (l == 0 or variant != "LT_ia")
        layer_step = None
        if step is not None:
          written = {}

          def read_entries(entry, kind=kind, index=index, written=written, groups=groups):
            group = groups[kind]
            for name in _entry_names(cfg):
              group = store(group, name, entry[name], loop_index, index, kind)
            written["group"] = group
            return {
              name: jax.lax.dynamic_index_in_dim(_get(group, name), loop_index, 0, False)[index]
              for name in _entry_names(cfg)
            }

          layer_step = (read_entries, step[kind])
        x_BxTxD, entry = block.apply(
          {"params": layer_params[l]},
          x_BxTxD,
          h_BxTxD,
          h_query,
          inject_query,
          has_h,
          rope,
          windows[l],
          layer_step,
        )
        if step is None:
          group = groups[kind]
          for name in _entry_names(cfg):
            group = store(group, name, entry[name], loop_index, index, kind)
          groups = {**groups, kind: group}
        else:
          groups = {**groups, kind: written["group"]}
      return (rms_norm(x_BxTxD), groups), None

    groups = {"full": cache.full, "window": cache.window}
    (h_BxTxD, groups), _ = jax.lax.scan(
      loop_body, (x0_normed, groups), jnp.arange(loops, dtype=jnp.int32)
    )
    return h_BxTxD, cache._replace(full=groups["full"], window=groups["window"])


def _embed(model: LoopedTransformer, tokens_BxT):
  return model.wte(tokens_BxT)
