"""Exact cached decoding for every looped variant: a key/value cache with one entry per
(loop, layer); optionally fewer loop slots (--kv_loops) and per-token exit.

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

  full layers     [N, L_full, B, S, ...]    slot s holds position s
  window layers   [N, L_win, B, R, ...]     ring buffer, R = min(window, S) slots; slot j
                                            holds the latest position p with p % R == j
  per slot        standard/GQA: k (after RoPE and the key norm) and v, Hkv heads each;
                  MLA: the latent norm(c_kv_down(x)) [r], re-expanded by c_k_up/c_v_up
                  (RoPE at the slot's position, then the key norm) at every step

N, the loop slots (`LoopSlots`, --kv_loops): K for the exact cache (loop i in slot i); a
ring of N < K (loop i writes slot i mod N and reads what the last loop written there
left, for earlier tokens the loop N, 2N, ... later: an approximation); or `first` (one
slot: loop 0 writes it, every later loop reads the first loop's keys/values). A prompt is
always computed exactly (its tokens attend over each other at every loop); the budget
decides what later tokens read.

Per-token exit (model/exit.py): the passes with `exit` in their name run the loops as a
while_loop for as long as any real token is still active. A token that has exited is no
longer computed: its h stays at its last computed loop, and its keys/values at every
later loop are that loop's (in the cache, and for the tokens attending over it in the
same pass), so a later token attending to it at a deeper loop reads its last computed
loop's keys/values. A pass over T tokens side by side (a prompt, or the teacher-forced
eval) computes exactly what decoding them one at a time computes.

`CachedDecoder` drives the model's own modules on the params of `LoopedTransformer`
unchanged: the embedding, the head and each layer's `Block.decode` (on its slice of the
stacked params) through `apply(..., method=...)`, the variants' rules through
model/variants.py. Here live only the cache and the loops over it; the attention reads
and writes its (loop, layer) slots through `layers.CacheSlots`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flt_jax.model import exit as exit_lib
from flt_jax.model import variants
from flt_jax.model.config import ModelConfig
from flt_jax.model.layers import Block, CacheSlots, rope_tables
from flt_jax.model.looped import LoopedTransformer, layer_params, loop_output


class GroupCache(NamedTuple):
  """The cache of one group of layers (full context, or one sliding window).

  Standard/GQA attention fills k and v, MLA fills c_kv; the other fields are None.
  K here is the loop slot count N (LoopSlots), S the group's slot count (the max
  length, or the ring size R for a window).
  """

  k_KxLxBxSxHkvxD: jax.Array | None = None
  v_KxLxBxSxHkvxD: jax.Array | None = None
  c_kv_KxLxBxSxR: jax.Array | None = None  # R here is the MLA rank (kv_lora_rank)


class DecodeCache(NamedTuple):
  """Keys/values of every (loop slot, layer) for the tokens decoded so far.

  length is the number of positions written, i.e. the position of the next token.
  A group without layers is None.
  """

  full: GroupCache | None
  window: GroupCache | None
  length: jax.Array  # int32 []


def cache_bytes(cache: DecodeCache) -> int:
  """Bytes the cache's arrays hold (arrays or their shapes)."""
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(cache))


@dataclasses.dataclass(frozen=True)
class LoopSlots:
  """Which cache slot holds each loop's keys/values (--kv_loops): `ring` = 0 is the
  exact cache (a slot per loop), N > 0 a ring of N slots (loop i writes slot i mod N),
  `first` one slot that only loop 0 writes."""

  ring: int = 0
  first: bool = False

  def count(self, loops: int) -> int:
    return 1 if self.first else (self.ring or loops)

  def slot(self, loop_index):
    if self.first:
      return 0
    return jnp.mod(loop_index, self.ring) if self.ring else loop_index

  def describe(self, loops: int) -> str:
    if self.first:
      return f"first (1 slot per layer, loop 0's keys/values for all {loops} loops)"
    if self.ring:
      return (
        f"ring of {self.ring} slots per layer for {loops} loops (loop i in slot i mod {self.ring})"
      )
    return f"exact ({loops} slots per layer, one per loop)"


def parse_kv_loops(text: str | int | None, loops: int, flag: str = "--kv_loops") -> LoopSlots:
  """--kv_loops: empty (the exact cache), N in 1..loops (a ring of N slots), or `first`;
  ValueError in one line otherwise."""
  if text is None or str(text).strip() == "":
    return LoopSlots()
  text = str(text).strip()
  if text == "first":
    return LoopSlots(first=True)
  try:
    n = int(text)
  except ValueError:
    n = 0
  if not 1 <= n <= loops:
    raise ValueError(
      f"{flag}={text} is invalid: give a slot count from 1 to the loop count {loops} (a ring "
      f"of N slots per layer; {loops} = the exact cache) or 'first' (loop 0's keys/values "
      "for every loop)"
    )
  return LoopSlots(ring=n)


def slot_positions(position, slots: int, ring: bool):
  """[slots] int32: the position each slot holds once `position` is written (negative:
  never written). A full cache's slot s holds position s; a ring's slot j the latest
  p <= position with p % slots == j."""
  j_S = jnp.arange(slots, dtype=jnp.int32)
  if not ring:
    return jnp.where(j_S <= position, j_S, -1)
  return position - jnp.mod(position - j_S, slots)


_FIELD = {"k": "k_KxLxBxSxHkvxD", "v": "v_KxLxBxSxHkvxD", "c_kv": "c_kv_KxLxBxSxR"}


def _write(cache_KxLxBxSx, entry_BxTx, loop_slot, layer_in_group: int, slot):
  """cache[loop_slot, layer, :, slot : slot + T] = entry, in place."""
  start = (loop_slot, layer_in_group, 0, slot) + (0,) * (entry_BxTx.ndim - 2)
  return jax.lax.dynamic_update_slice(cache_KxLxBxSx, entry_BxTx[None, None], start)


class _LayerCache:
  """One (loop slot, layer)'s part of its group's cache: `write` puts the layer's entry
  where the pass keeps it; `store` (layers.CacheSlots.store, a step) also returns the
  layer's slots with it written. `group` is the updated GroupCache. A read-only one
  (`first` slots after loop 0) writes nothing: the slots keep loop 0's entries."""

  def __init__(
    self, group: GroupCache, put, loop_slot, layer_in_group: int, kind: str, writes: bool
  ):
    self.group = group
    self._at = (loop_slot, layer_in_group, kind)
    self._put = put
    self._writes = writes

  def write(self, entry: dict) -> None:
    if not self._writes:
      return
    fields = {
      _FIELD[name]: self._put(getattr(self.group, _FIELD[name]), value, *self._at)
      for name, value in entry.items()
    }
    self.group = self.group._replace(**fields)

  def store(self, entry: dict) -> dict:
    self.write(entry)
    loop_slot, layer_in_group, _ = self._at

    def layer_slots(cache_KxLxBxSx):
      return jax.lax.dynamic_index_in_dim(cache_KxLxBxSx, loop_slot, 0, False)[layer_in_group]

    return {name: layer_slots(getattr(self.group, _FIELD[name])) for name in entry}


class NewTokens(NamedTuple):
  """The new tokens of one pass (a prompt, one token per row in a step, or a whole
  teacher-forced sequence), as every loop sees them.

  put(cache_KxLxBxSx, entry_BxTx, loop_slot, layer_in_group, group) writes one field of
  a layer's cache entry where this pass keeps it (group: "full" or "window"); None for a
  pass without a decode cache. slots is None when the tokens attend over each other (as
  in training); a step's is {group: (positions_S, cos_1xSxD2, sin_1xSxD2)}, what
  `layers.CacheSlots` needs besides the store. segment_ids_BxT keeps a pass over each
  other within documents (config.model.separate_documents).
  """

  x0_BxTxD: jax.Array  # the float32 embedding
  x0_normed: jax.Array
  cos_1xTxD2: jax.Array  # rotary rows at the tokens' positions ([B or 1, T, D/2])
  sin_1xTxD2: jax.Array
  layer_params: tuple  # each layer's Block params (its slice of the stack)
  put: Callable | None
  slots: dict | None
  segment_ids_BxT: jax.Array | None = None


class Exits(NamedTuple):
  """What a pass with per-token exit ran: loops_run, the loop iterations it executed (a
  loop runs while any real token is active: a batch's or a sequence's slowest token),
  and exit_loops_BxT, the loops each token ran (what decoding it alone executes)."""

  loops_run: jax.Array  # int32 []
  exit_loops_BxT: jax.Array  # int32


def _keep(active_BxT, previous: dict, entry: dict) -> dict:
  """The entries the tokens attend with and cache: new for the active tokens, the last
  computed loop's for those that have exited."""
  return {
    name: jnp.where(
      active_BxT.reshape(active_BxT.shape + (1,) * (new.ndim - 2)), new, previous[name]
    )
    for name, new in entry.items()
  }


class CachedDecoder:
  """Prefill and single-token steps of a LoopedTransformer's params with a DecodeCache.

    decoder = CachedDecoder(model_cfg)                # kv_loops=parse_kv_loops("4", 12)
    cache = decoder.init_cache(loops=12, batch=1, max_len=256)
    logits_BxV, cache = decoder.prefill(params, prompt_BxT, prompt_len, cache)
    logits_BxV, cache = decoder.step(params, next_token_B, cache)   # at cache.length
    # per-token exit (model/exit.py): the same passes, plus what they ran
    logits_BxV, cache, exits = decoder.step_exit(params, next_token_B, cache, rule)
    h_BxTxD, exits = decoder.forward_exit(params, tokens_BxT, rule)  # teacher-forced

  The loop count is the cache's leading axis for the exact cache, else `loops=`. Pure
  functions of their arguments, usable under jax.jit and inside jax.lax loops.
  """

  def __init__(self, cfg: ModelConfig, kv_loops: LoopSlots | None = None):
    self.cfg = cfg
    self.loop_slots = kv_loops or LoopSlots()
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
    """An empty cache for `loops` loops (in LoopSlots.count(loops) loop slots), `batch`
    rows and positions 0..max_len-1."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    loop_slots = self.loop_slots.count(loops)

    def group(n_layers: int, slots: int) -> GroupCache | None:
      if not n_layers:
        return None
      lead = (loop_slots, n_layers, batch, slots)
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

  # -- the passes

  def prefill(self, params, tokens_BxT, length, cache: DecodeCache, *, loops: int | None = None):
    """Runs the prompt tokens_BxT (its first `length` tokens real, the rest padding that
    later steps overwrite) at positions 0..T-1 in one pass, fills the cache and returns
    the logits [B, V] at position length - 1. `cache` must be empty (length 0)."""
    tokens, length = self._prompt(params, tokens_BxT, length, cache)
    h_BxTxD, cache = self._loops(tokens, cache, self._loops_of(cache, loops))
    last_BxD = jnp.take(h_BxTxD, length - 1, axis=1)
    return self._logits(params, last_BxD), cache._replace(length=length)

  def step(self, params, tokens_B, cache: DecodeCache, *, loops: int | None = None):
    """Feeds one token per row at position cache.length; returns the logits [B, V] of
    the next one and the cache with this token's keys/values of every (loop, layer)."""
    tokens = self._one_token(params, tokens_B, cache)
    h_BxTxD, cache = self._loops(tokens, cache, self._loops_of(cache, loops))
    return self._logits(params, h_BxTxD[:, 0]), cache._replace(length=cache.length + 1)

  def prefill_exit(
    self,
    params,
    tokens_BxT,
    length,
    cache: DecodeCache,
    rule: exit_lib.ExitRule,
    *,
    loops: int | None = None,
  ):
    """prefill with per-token exit (the prompt's tokens side by side, each until it
    exits): (logits [B, V] at position length - 1, cache, Exits). Positions >= length
    (padding) do not keep the loops going."""
    tokens, length = self._prompt(params, tokens_BxT, length, cache)
    real_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]) < length, tokens_BxT.shape)
    h_BxTxD, cache, exits = self._exit_pass(
      params, tokens, cache, rule, rule.threshold, real_BxT, self._loops_of(cache, loops)
    )
    last_BxD = jnp.take(h_BxTxD, length - 1, axis=1)
    return self._logits(params, last_BxD), cache._replace(length=length), exits

  def step_exit(
    self,
    params,
    tokens_B,
    cache: DecodeCache,
    rule: exit_lib.ExitRule,
    *,
    loops: int | None = None,
    real_B=None,
  ):
    """step with per-token exit: (logits [B, V], cache, Exits). A row's loops end when it
    exits; the step's loop iterations end once every real row (real_B, default all:
    finished sequences are not real) has exited."""
    tokens = self._one_token(params, tokens_B, cache)
    real_Bx1 = jnp.ones(tokens_B.shape + (1,), bool) if real_B is None else real_B[:, None]
    h_BxTxD, cache, exits = self._exit_pass(
      params, tokens, cache, rule, rule.threshold, real_Bx1, self._loops_of(cache, loops)
    )
    logits_BxV = self._logits(params, h_BxTxD[:, 0])
    return logits_BxV, cache._replace(length=cache.length + 1), exits

  def forward_exit(
    self,
    params,
    tokens_BxT,
    rule: exit_lib.ExitRule,
    threshold=None,
    *,
    real_BxT=None,
    segment_ids_BxT=None,
    positions_BxT=None,
  ):
    """The teacher-forced forward with per-token exit over rule.max_loops loops, no
    decode cache: (h [B, T, D], each token's at its exit, Exits). real_BxT (default all)
    marks the tokens whose activity keeps the loops going (not padding); segment ids and
    positions as in LoopedTransformer (used with cfg.separate_documents). `threshold`
    (default the rule's) may be traced: one program serves a criterion's thresholds."""
    if rule.max_loops < 1:
      raise ValueError(f"the exit rule {rule.label} has no max_loops; set it (with_max_loops)")
    T = tokens_BxT.shape[1]
    if not self.cfg.separate_documents:
      segment_ids_BxT = positions_BxT = None
    table_cos, table_sin = self._rope(T)
    if positions_BxT is None:
      cos, sin = table_cos[:T][None], table_sin[:T][None]
    else:
      cos, sin = table_cos[positions_BxT], table_sin[positions_BxT]
    tokens = self.new_tokens(params, tokens_BxT, cos, sin, None, None, segment_ids_BxT)
    real_BxT = jnp.ones(tokens_BxT.shape, bool) if real_BxT is None else real_BxT
    threshold = rule.threshold if threshold is None else threshold
    h_BxTxD, _, exits = self._exit_pass(
      params, tokens, None, rule, threshold, real_BxT, rule.max_loops
    )
    return h_BxTxD, exits

  def logits(self, params, h_BxTxD):
    """The model's head on h (softcapped float32 logits over the vocabulary)."""
    return self._logits(params, h_BxTxD)

  def _prompt(self, params, tokens_BxT, length, cache: DecodeCache):
    """(NewTokens, length) of a prompt at positions 0..T-1 writing into `cache`."""
    T = tokens_BxT.shape[1]
    _, _, max_len = self._dims(cache)
    if max_len < T:
      raise ValueError(f"the padded prompt ({T} tokens) does not fit the cache ({max_len})")
    table_cos, table_sin = self._rope(max_len)
    length = jnp.asarray(length, jnp.int32)
    ring = self.ring_size(max_len)
    # The ring's slot j takes the prompt's last position p < length with p % ring == j.
    ring_positions_R = slot_positions(length - 1, ring, ring=True) if ring else None

    def put(cache_KxLxBxSx, entry_BxTx, loop_slot, index, kind):
      if kind == "window":
        entry_BxTx = jnp.take(entry_BxTx, jnp.clip(ring_positions_R, 0, T - 1), axis=1)
      return _write(cache_KxLxBxSx, entry_BxTx, loop_slot, index, 0)

    cos, sin = table_cos[:T][None], table_sin[:T][None]
    return self.new_tokens(params, tokens_BxT, cos, sin, put), length

  def _one_token(self, params, tokens_B, cache: DecodeCache) -> NewTokens:
    """NewTokens of one token per row at position cache.length, attending over the cache."""
    _, _, max_len = self._dims(cache)
    position = cache.length
    table_cos, table_sin = self._rope(max_len)
    ring = self.ring_size(max_len)

    def put(cache_KxLxBxSx, entry_Bx1x, loop_slot, index, kind):
      slot = position if kind == "full" else jnp.mod(position, ring)
      return _write(cache_KxLxBxSx, entry_Bx1x, loop_slot, index, slot)

    slots = {}
    for kind, size in (("full", max_len), ("window", ring)):
      if size:
        positions_S = slot_positions(position, size, ring=kind == "window")
        at_S = jnp.maximum(positions_S, 0)
        slots[kind] = (positions_S, table_cos[at_S][None], table_sin[at_S][None])
    return self.new_tokens(
      params,
      tokens_B[:, None],
      jax.lax.dynamic_slice_in_dim(table_cos, position, 1)[None],
      jax.lax.dynamic_slice_in_dim(table_sin, position, 1)[None],
      put,
      slots,
    )

  # -- the loops

  def new_tokens(
    self, params, tokens_BxT, cos_1xTxD2, sin_1xTxD2, put, slots=None, segment_ids_BxT=None
  ) -> NewTokens:
    """The model's embedding of the new tokens and each layer's params, for `loop`."""
    params = nn.meta.unbox(params)
    x0, x0_normed = self.model.apply({"params": params}, tokens_BxT, method=LoopedTransformer.embed)
    per_layer = tuple(layer_params(params, layer) for layer in range(self.cfg.n_layer))
    return NewTokens(x0, x0_normed, cos_1xTxD2, sin_1xTxD2, per_layer, put, slots, segment_ids_BxT)

  def loop(self, tokens: NewTokens, h_BxTxD, groups: dict, loop_index):
    """One loop over the new tokens: the variant's loop input and query source, then
    each layer's Block.decode, which writes its entry into this (loop, layer)'s slots of
    `groups` ({"full", "window"}: GroupCache). Returns (h, groups)."""
    h_BxTxD, groups, _ = self._loop(tokens, h_BxTxD, groups, loop_index)
    return h_BxTxD, groups

  def _loop(
    self, tokens: NewTokens, h_BxTxD, groups, loop_index, writes=True, active_BxT=None, latest=None
  ):
    """loop(), and for per-token exit: `active_BxT` (the tokens still computed) and
    `latest` (each layer's entries of the new tokens as of their last computed loop).
    Returns (h, groups, every layer's entries as attended: the next `latest`). groups
    None: no decode cache (the tokens attend over each other only)."""
    variant = self.cfg.variant
    has_h = loop_index > 0
    x_BxTxD = variants.loop_input(variant, h_BxTxD, tokens.x0_BxTxD, tokens.x0_normed, has_h)
    h_query = variants.query_source(variant, h_BxTxD)
    loop_slot = self.loop_slots.slot(loop_index)
    entries = []
    for layer, (kind, index) in enumerate(self._layer_group):
      keep = None if active_BxT is None else functools.partial(_keep, active_BxT, latest[layer])
      cache = slots = None
      if groups is not None:
        cache = _LayerCache(groups[kind], tokens.put, loop_slot, index, kind, writes)
        if tokens.slots is not None:
          slots = CacheSlots(cache.store, *tokens.slots[kind])
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
        keep,
        tokens.segment_ids_BxT,
        method=Block.decode,
      )
      if cache is not None:
        if slots is None:  # a prompt: its tokens attended over each other, now cache them
          cache.write(entry)
        groups = {**groups, kind: cache.group}
      entries.append(entry)
    return loop_output(x_BxTxD), groups, tuple(entries)

  def _loops(self, tokens: NewTokens, cache: DecodeCache, loops: int):
    """The K loops in order (a lax.scan over the loop index; params closed over, as
    the training scan broadcasts them). With `first` slots loop 0 runs alone: the only
    loop that writes."""
    groups = {"full": cache.full, "window": cache.window}
    h_BxTxD, first = tokens.x0_normed, 0
    if self.loop_slots.first:
      h_BxTxD, groups = self.loop(tokens, h_BxTxD, groups, jnp.int32(0))
      first = 1

    def body(carry, loop_index):
      h_BxTxD, groups, _ = self._loop(tokens, *carry, loop_index, not self.loop_slots.first)
      return (h_BxTxD, groups), None

    (h_BxTxD, groups), _ = jax.lax.scan(
      body, (h_BxTxD, groups), jnp.arange(first, loops, dtype=jnp.int32)
    )
    return h_BxTxD, cache._replace(full=groups["full"], window=groups["window"])

  def _exit_pass(self, params, tokens: NewTokens, cache, rule, threshold, real_BxT, loops: int):
    """The loops with per-token exit, a while_loop that runs loop i while i < loops and
    a real token is active: (h of each token at its exit, cache, Exits). An exited token
    is no longer updated: its h and keys/values stay those of its last computed loop
    (`_keep`), and once the loops end the cache's slots of the loops not run get each
    token's last entries, so later tokens read those at every deeper loop."""
    if not rule.max_loops:  # a rule without its own cap stops at the pass's loop count
      rule = exit_lib.with_max_loops(rule, loops)
    B, T = tokens.x0_BxTxD.shape[:2]
    groups = None if cache is None else {"full": cache.full, "window": cache.window}
    logits_fn = functools.partial(self._logits, params) if rule.reads_head else None
    read_only = self.loop_slots.first  # loops after the first write no slot

    def one_loop(carry, loop_index, writes):
      h_BxTxD, groups, latest, state = carry
      h_new, groups, latest = self._loop(
        tokens, h_BxTxD, groups, loop_index, writes, state.active_BxT, latest
      )
      h_new = jnp.where(state.active_BxT[..., None], h_new, h_BxTxD)
      state = exit_lib.after_loop(rule, state, loop_index, h_BxTxD, h_new, logits_fn, threshold)
      return h_new, groups, latest, state

    def cond(carry):
      loop_index, (_, _, _, state) = carry
      return (loop_index < loops) & jnp.any(state.active_BxT & real_BxT)

    def body(carry):
      loop_index, inner = carry
      return loop_index + 1, one_loop(inner, loop_index, not read_only)

    state = exit_lib.start(rule, B, T, self.cfg.vocab_size)
    carry = (tokens.x0_normed, groups, self._no_entries(B, T), state)
    start = 0
    if read_only and groups is not None:  # loop 0 alone: the one loop that writes
      carry, start = one_loop(carry, jnp.int32(0), True), 1
    loops_run, (h_BxTxD, groups, latest, state) = jax.lax.while_loop(
      cond, body, (jnp.int32(start), carry)
    )
    if groups is not None:
      if not read_only:
        groups = self._write_latest(tokens, groups, latest, loops_run, loops)
      cache = cache._replace(full=groups["full"], window=groups["window"])
    return h_BxTxD, cache, Exits(loops_run, state.loops_BxT)

  def _write_latest(self, tokens: NewTokens, groups: dict, latest, first_loop, loops: int):
    """Writes every layer's `latest` entries into the slots of loops first_loop..loops-1
    (the loops a pass did not run, which its tokens, all exited, would have kept)."""

    def body(loop_index, groups):
      loop_slot = self.loop_slots.slot(loop_index)
      for layer, (kind, index) in enumerate(self._layer_group):
        cache = _LayerCache(groups[kind], tokens.put, loop_slot, index, kind, True)
        cache.write(latest[layer])
        groups = {**groups, kind: cache.group}
      return groups

    return jax.lax.fori_loop(first_loop, loops, body, groups)

  def _no_entries(self, batch: int, length: int) -> tuple:
    """Each layer's cache entries of `length` tokens, zero (the shapes Attention.qkv gives)."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if cfg.kv_lora_rank:
      entry = {"c_kv": jnp.zeros((batch, length, cfg.kv_lora_rank), dtype)}
    else:
      kv = jnp.zeros((batch, length, cfg.n_kv_head, cfg.head_dim), dtype)
      entry = {"k": kv, "v": kv}
    return (entry,) * cfg.n_layer

  def _loops_of(self, cache: DecodeCache, loops: int | None) -> int:
    """The pass's loop count: `loops`, or for the exact cache its leading axis."""
    slots, _, _ = self._dims(cache)
    if loops is None:
      if self.loop_slots != LoopSlots():
        raise ValueError("a cache with fewer loop slots than loops needs loops= in each pass")
      return slots
    if self.loop_slots.count(loops) != slots:
      raise ValueError(
        f"the cache has {slots} loop slots, not the {self.loop_slots.count(loops)} "
        f"that {loops} loops need"
      )
    return int(loops)

  def _dims(self, cache: DecodeCache):
    """(loop slots, batch, max_len) of a cache (the last layer is always full context)."""
    leaf = next(a for a in cache.full if a is not None)
    return leaf.shape[0], leaf.shape[2], leaf.shape[3]

  def _logits(self, params, h_BxD):
    return self.model.apply({"params": params}, h_BxD, method=LoopedTransformer.logits)
