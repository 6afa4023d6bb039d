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

`CachedDecoder` drives the model's own modules on the params of `LoopedTransformer`
unchanged: the embedding, the head and each layer's `Block.decode` (on its slice of the
stacked params) through `apply(..., method=...)`, the variants' rules through
model/variants.py. Here live only the cache and the loops over it; the attention reads
and writes its (loop, layer) slots through `layers.CacheSlots`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flt_jax.model import variants
from flt_jax.model.config import ModelConfig
from flt_jax.model.layers import Block, CacheSlots, rope_tables
from flt_jax.model.looped import LoopedTransformer, layer_params, loop_output


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


_FIELD = {"k": "k_KxLxBxSxHkvxD", "v": "v_KxLxBxSxHkvxD", "c_kv": "c_kv_KxLxBxSxR"}


def _write(cache_KxLxBxSx, entry_BxTx, loop_index, layer_in_group: int, slot):
  """cache[loop, layer, :, slot : slot + T] = entry, in place."""
  start = (loop_index, layer_in_group, 0, slot) + (0,) * (entry_BxTx.ndim - 2)
  return jax.lax.dynamic_update_slice(cache_KxLxBxSx, entry_BxTx[None, None], start)


class _LayerCache:
  """One (loop, layer)'s part of its group's cache: `write` puts the layer's entry
  where the pass keeps it; `store` (layers.CacheSlots.store, a step) also returns the
  layer's slots with it written. `group` is the updated GroupCache."""

  def __init__(self, group: GroupCache, put, loop_index, layer_in_group: int, kind: str):
    self.group = group
    self._at = (loop_index, layer_in_group, kind)
    self._put = put

  def write(self, entry: dict) -> None:
    fields = {
      _FIELD[name]: self._put(getattr(self.group, _FIELD[name]), value, *self._at)
      for name, value in entry.items()
    }
    self.group = self.group._replace(**fields)

  def store(self, entry: dict) -> dict:
    self.write(entry)
    loop_index, layer_in_group, _ = self._at

    def layer_slots(cache_KxLxBxSx):
      return jax.lax.dynamic_index_in_dim(cache_KxLxBxSx, loop_index, 0, False)[layer_in_group]

    return {name: layer_slots(getattr(self.group, _FIELD[name])) for name in entry}


class NewTokens(NamedTuple):
  """The new tokens of one pass (a prompt, or one token per row in a step), as every loop
  sees them.

  put(cache_KxLxBxSx, entry_BxTx, loop_index, layer_in_group, group) writes one field of
  a layer's cache entry where this pass keeps it (group: "full" or "window"). slots is
  None for a prompt (its tokens attend over each other, as in training); a step's is
  {group: (positions_S, cos_1xSxD2, sin_1xSxD2)}, what `layers.CacheSlots` needs besides
  the store.
  """

  x0_BxTxD: jax.Array  # the float32 embedding
  x0_normed: jax.Array
  cos_1xTxD2: jax.Array  # rotary rows at the tokens' positions
  sin_1xTxD2: jax.Array
  layer_params: tuple  # each layer's Block params (its slice of the stack)
  put: Callable
  slots: dict | None


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
    self.block = Block(cfg)
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
    length = jnp.asarray(length, jnp.int32)
    ring = self.ring_size(max_len)
    # The ring's slot j takes the prompt's last position p < length with p % ring == j.
    ring_positions_R = slot_positions(length - 1, ring, ring=True) if ring else None

    def put(cache_KxLxBxSx, entry_BxTx, loop_index, index, kind):
      if kind == "window":
        entry_BxTx = jnp.take(entry_BxTx, jnp.clip(ring_positions_R, 0, T - 1), axis=1)
      return _write(cache_KxLxBxSx, entry_BxTx, loop_index, index, 0)

    tokens = self.new_tokens(params, tokens_BxT, table_cos[:T][None], table_sin[:T][None], put)
    h_BxTxD, cache = self._loops(tokens, cache, loops)
    last_BxD = jnp.take(h_BxTxD, length - 1, axis=1)
    return self._logits(params, last_BxD), cache._replace(length=length)

  def step(self, params, tokens_B, cache: DecodeCache):
    """Feeds one token per row at position cache.length; returns the logits [B, V] of
    the next one and the cache with this token's keys/values of every (loop, layer)."""
    loops, _, max_len = self._dims(cache)
    position = cache.length
    table_cos, table_sin = self._rope(max_len)
    ring = self.ring_size(max_len)

    def put(cache_KxLxBxSx, entry_Bx1x, loop_index, index, kind):
      slot = position if kind == "full" else jnp.mod(position, ring)
      return _write(cache_KxLxBxSx, entry_Bx1x, loop_index, index, slot)

    slots = {}
    for kind, size in (("full", max_len), ("window", ring)):
      if size:
        positions_S = slot_positions(position, size, ring=kind == "window")
        at_S = jnp.maximum(positions_S, 0)
        slots[kind] = (positions_S, table_cos[at_S][None], table_sin[at_S][None])
    tokens = self.new_tokens(
      params,
      tokens_B[:, None],
      jax.lax.dynamic_slice_in_dim(table_cos, position, 1)[None],
      jax.lax.dynamic_slice_in_dim(table_sin, position, 1)[None],
      put,
      slots,
    )
    h_BxTxD, cache = self._loops(tokens, cache, loops)
    return self._logits(params, h_BxTxD[:, 0]), cache._replace(length=position + 1)

  # -- the loops

  def new_tokens(self, params, tokens_BxT, cos_1xTxD2, sin_1xTxD2, put, slots=None) -> NewTokens:
    """The model's embedding of the new tokens and each layer's params, for `loop`."""
    params = nn.meta.unbox(params)
    x0, x0_normed = self.model.apply({"params": params}, tokens_BxT, method=LoopedTransformer.embed)
    per_layer = tuple(layer_params(params, layer) for layer in range(self.cfg.n_layer))
    return NewTokens(x0, x0_normed, cos_1xTxD2, sin_1xTxD2, per_layer, put, slots)

  def loop(self, tokens: NewTokens, h_BxTxD, groups: dict, loop_index):
    """One loop over the new tokens: the variant's loop input and query source, then
    each layer's Block.decode, which writes its entry into this (loop, layer)'s slots of
    `groups` ({"full", "window"}: GroupCache). Returns (h, groups)."""
    variant = self.cfg.variant
    has_h = loop_index > 0
    x_BxTxD = variants.loop_input(variant, h_BxTxD, tokens.x0_BxTxD, tokens.x0_normed, has_h)
    h_query = variants.query_source(variant, h_BxTxD)
    for layer, (kind, index) in enumerate(self._layer_group):
      cache = _LayerCache(groups[kind], tokens.put, loop_index, index, kind)
      slots = None if tokens.slots is None else CacheSlots(cache.store, *tokens.slots[kind])
      x_BxTxD, entry = self.block.apply(
        {"params": tokens.layer_params[layer]},
        x_BxTxD,
        h_BxTxD,
        h_query,
        variants.injects_query(variant, has_h, layer),
        has_h,
        tokens.cos_1xTxD2,
        tokens.sin_1xTxD2,
        self.cfg.window_sizes[layer],
        slots,
        method=Block.decode,
      )
      if slots is None:  # a prompt: its tokens attended over each other, now cache them
        cache.write(entry)
      groups = {**groups, kind: cache.group}
    return loop_output(x_BxTxD), groups

  def _loops(self, tokens: NewTokens, cache: DecodeCache, loops: int):
    """The K loops in order (a lax.scan over the loop index; params closed over, as
    the training scan broadcasts them)."""

    def body(carry, loop_index):
      return self.loop(tokens, *carry, loop_index), None

    groups = {"full": cache.full, "window": cache.window}
    (h_BxTxD, groups), _ = jax.lax.scan(
      body, (tokens.x0_normed, groups), jnp.arange(loops, dtype=jnp.int32)
    )
    return h_BxTxD, cache._replace(full=groups["full"], window=groups["window"])

  def _dims(self, cache: DecodeCache):
    """(loops, batch, max_len) of a cache (the last layer is always full context)."""
    leaf = next(a for a in cache.full if a is not None)
    return leaf.shape[0], leaf.shape[2], leaf.shape[3]

  def _logits(self, params, h_BxD):
    return self.model.apply({"params": params}, h_BxD, method=LoopedTransformer.logits)
