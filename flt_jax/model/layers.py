"""Building blocks of the reference architecture (arXiv:2605.18797, official code): rotary
embedding, MHA/GQA and MLA attention, relu² MLP, and the block with the ways the previous
loop's output can enter it; attention and block also run in cached decoding (`decode`).

Tensors that a remat policy may save by name (`config.model.remat_policy`) are tagged
with `jax.ad_checkpoint.checkpoint_name`: "qkv" (the q, k, v projections), "attn_out"
(attention output before c_proj), "mlp_in" (the stream entering the MLP, before its norm),
"mlp_hidden" (c_fc's output before relu²).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flt_jax.model import attention, variants
from flt_jax.model.config import ModelConfig
from flt_jax.model.norm import rms_norm

# Logical axes of an activation [B, T, D]; a no-op until the mesh code installs rules.
ACTIVATION_AXES = ("batch", "length", "act_embed")


def constrain_activation(x_BxTxD):
  """Lets a sharding rules table place the [B, T, D] stream (identity without one)."""
  return nn.with_logical_constraint(x_BxTxD, ACTIVATION_AXES)


def rope_tables(head_dim: int, length: int, base: float, round_to_bf16: bool):
  """cos, sin of shape [length, head_dim // 2] as float32 numpy constants."""
  inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq.astype(np.float32))
  cos, sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
  if round_to_bf16:  # the published reference keeps its tables in bfloat16
    cos = cos.astype(jnp.bfloat16).astype(np.float32)
    sin = sin.astype(jnp.bfloat16).astype(np.float32)
  return cos, sin


def apply_rope(x_BxTxHxD, cos_BxTxD2, sin_BxTxD2):
  """Rotates the two halves of each head as pairs (the reference's convention).

  cos/sin are [B or 1, T, head_dim // 2]: one row per token's position.
  """
  d2 = x_BxTxHxD.shape[-1] // 2
  x32 = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x32[..., :d2], x32[..., d2:]
  cos, sin = cos_BxTxD2[:, :, None, :], sin_BxTxD2[:, :, None, :]
  return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def uniform_init(fan_in: int):
  """Uniform with std 1/sqrt(fan_in), as the reference initialises its matrices."""
  bound = math.sqrt(3.0) / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(features: int, axes: tuple[str, str], init, cfg: ModelConfig, name: str):
  return nn.Dense(
    features,
    use_bias=False,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(init, axes),
    name=name,
  )


class CacheSlots(NamedTuple):
  """One (loop, layer)'s key/value cache as `Attention.decode` sees it (model/decode.py
  builds it; the cache's layout is its business).

  store(entry) writes the new tokens' cache entry (as `Attention.qkv` returns it) into
  the slots and returns every slot's entry, the new one included; positions_S is the
  position each slot then holds (negative: empty); cos/sin are the rotary rows at those
  positions (MLA applies RoPE to the keys it re-expands from its latent).
  """

  store: Callable[[dict], dict]
  positions_S: jax.Array
  cos_1xSxD2: jax.Array
  sin_1xSxD2: jax.Array


class Attention(nn.Module):
  """Causal self-attention whose queries may come from another stream (injection).

  With kv_lora_rank > 0 (MLA) keys and values come from norm(c_kv_down(x)). Sliding
  windows apply to MLA as well; the reference's MLA ignores its window (always full
  context), so MLA checkpoints with 'S' layers are not interchangeable with it.
  segment_ids_BxT (packed documents) keeps attention within each document.

  Two modes share `qkv`: `__call__` attends over its own T tokens (training, eval);
  `decode` also returns what a key/value cache keeps of them, and attends either over
  its own tokens (a prompt) or over the cache's slots (model/decode.py).
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    H, Hkv, hd, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    self.c_q = dense(H * hd, ("embed", "heads"), uniform_init(D), cfg, "c_q")
    if cfg.kv_lora_rank:
      r = cfg.kv_lora_rank
      self.c_kv_down = dense(r, ("embed", "kv_lora"), uniform_init(D), cfg, "c_kv_down")
      self.c_k_up = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_k_up")
      self.c_v_up = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_v_up")
    else:
      self.c_k = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_k")
      self.c_v = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_v")
    self.c_proj = dense(D, ("heads", "embed"), nn.initializers.zeros, cfg, "c_proj")

  def __call__(self, q_in_BxTxD, kv_in_BxTxD, cos, sin, window_left, segment_ids_BxT=None):
    q_BxTxHxD, k_BxTxHkvxD, v_BxTxHkvxD, _ = self.qkv(q_in_BxTxD, kv_in_BxTxD, cos, sin)
    y_BxTxHxD = self._attend(q_BxTxHxD, k_BxTxHkvxD, v_BxTxHkvxD, window_left, segment_ids_BxT)
    return self._project_out(y_BxTxHxD)

  def qkv(self, q_in_BxTxD, kv_in_BxTxD, cos, sin):
    """Projections, RoPE and the query/key norms: q [B, T, H, hd], k and v [B, T, Hkv, hd]
    in the compute dtype, and the cache entry of these T tokens: {"k", "v"} (those k and
    v), or for MLA {"c_kv"}, the latent norm(c_kv_down(x)) [B, T, kv_lora_rank]."""
    cfg = self.cfg
    q = self.c_q(q_in_BxTxD)
    if cfg.kv_lora_rank:
      c_kv_BxTxR = rms_norm(self.c_kv_down(kv_in_BxTxD))
      k, v = self.c_k_up(c_kv_BxTxR), self.c_v_up(c_kv_BxTxR)
    else:
      k, v = self.c_k(kv_in_BxTxD), self.c_v(kv_in_BxTxD)
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    q_BxTxHxD = self._rotated_heads(q, cfg.n_head, cos, sin)
    k_BxTxHkvxD = self._rotated_heads(k, cfg.n_kv_head, cos, sin)
    compute = jnp.dtype(cfg.dtype)
    q_BxTxHxD, k_BxTxHkvxD = q_BxTxHxD.astype(compute), k_BxTxHkvxD.astype(compute)
    v_BxTxHkvxD = self._value_heads(v)
    if cfg.kv_lora_rank:
      entry = {"c_kv": c_kv_BxTxR}
    else:
      entry = {"k": k_BxTxHkvxD, "v": v_BxTxHkvxD}
    return q_BxTxHxD, k_BxTxHkvxD, v_BxTxHkvxD, entry

  def decode(
    self,
    q_in_BxTxD,
    kv_in_BxTxD,
    cos,
    sin,
    window_left,
    slots: CacheSlots | None,
    keep: Callable[[dict], dict] | None = None,
    segment_ids_BxT=None,
  ):
    """Cached decoding: returns (output [B, T, D], the cache entry of these T tokens).

    slots None (a prompt): attends over its own T tokens as `__call__` does (within
    `segment_ids_BxT`'s documents when given). Otherwise the entry is stored in `slots`
    and the queries attend over every slot that holds a position (a window's cache
    keeps only the positions the window sees). keep(entry) -> the entry these tokens
    attend with and cache instead (per-token exit: a token that has exited keeps its
    last computed loop's keys/values; model/decode.py).
    """
    q_BxTxHxD, k_BxTxHkvxD, v_BxTxHkvxD, entry = self.qkv(q_in_BxTxD, kv_in_BxTxD, cos, sin)
    if keep is not None:
      entry = keep(entry)
    if slots is None:
      if keep is not None:
        k_BxTxHkvxD, v_BxTxHkvxD = self._entry_kv(entry, cos, sin)
      y_BxTxHxD = self._attend(q_BxTxHxD, k_BxTxHkvxD, v_BxTxHkvxD, window_left, segment_ids_BxT)
      return self._project_out(y_BxTxHxD), entry
    k_BxSxHkvxD, v_BxSxHkvxD = self._entry_kv(
      slots.store(entry), slots.cos_1xSxD2, slots.sin_1xSxD2
    )
    B, T = q_BxTxHxD.shape[:2]
    visible_BxTxS = jnp.broadcast_to(slots.positions_S >= 0, (B, T, slots.positions_S.shape[0]))
    y_BxTxHxD = attention.masked_attention(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, visible_BxTxS)
    return self._project_out(y_BxTxHxD), entry

  def _entry_kv(self, entry: dict, cos, sin):
    """Keys and values [B, S, Hkv, hd] of cache entries: as kept, or for MLA the latent
    re-expanded with RoPE at the entries' positions (cos/sin rows) and the key norm."""
    if not self.cfg.kv_lora_rank:
      return entry["k"], entry["v"]
    c_kv_BxSxR = entry["c_kv"]
    k_BxSxHkvxD = self._rotated_heads(self.c_k_up(c_kv_BxSxR), self.cfg.n_kv_head, cos, sin)
    return k_BxSxHkvxD.astype(jnp.dtype(self.cfg.dtype)), self._value_heads(self.c_v_up(c_kv_BxSxR))

  def _rotated_heads(self, x_BxTxF, heads: int, cos, sin):
    """Split into heads, rotate (RoPE), norm: the queries and keys."""
    B, T, _ = x_BxTxF.shape
    return rms_norm(apply_rope(x_BxTxF.reshape(B, T, heads, self.cfg.head_dim), cos, sin))

  def _value_heads(self, v_BxTxF):
    B, T, _ = v_BxTxF.shape
    v_BxTxHkvxD = v_BxTxF.reshape(B, T, self.cfg.n_kv_head, self.cfg.head_dim)
    return v_BxTxHkvxD.astype(jnp.dtype(self.cfg.dtype))

  def _attend(self, q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, window_left, segment_ids_BxT):
    return attention.attend(
      q_BxTxHxD,
      k_BxSxHkvxD,
      v_BxSxHkvxD,
      window_left=window_left,
      impl=self.cfg.attention_impl,
      options=self.cfg.attention_options,
      q_segment_ids_BxT=segment_ids_BxT,
      kv_segment_ids_BxS=segment_ids_BxT,
    )

  def _project_out(self, y_BxTxHxD):
    y_BxTxHxD = checkpoint_name(y_BxTxHxD, "attn_out")
    B, T, H, hd = y_BxTxHxD.shape
    return self.c_proj(y_BxTxHxD.reshape(B, T, H * hd))


@jax.custom_vjp
def relu2_matmul(h_BxTxF, w_FxD):
  """relu(h)² @ w, keeping only h for the backward pass (relu(h)² is recomputed there,
  one elementwise op, instead of storing it, relu(h) and the sign mask)."""
  return _dot_last(jnp.square(jax.nn.relu(h_BxTxF)), w_FxD)


def _dot_last(x, w):  # x [..., F] @ w [F, D], as nn.Dense computes it
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _relu2_matmul_fwd(h, w):
  return relu2_matmul(h, w), (h, w)


def _relu2_matmul_bwd(res, g):
  h, w = res
  r = jax.nn.relu(h)
  lead = tuple(range(h.ndim - 1))
  # dw^T = g^T relu(h)^2, transposed afterwards: the backend lays out the [.., D] operand
  # g for this product, not the four times larger relu(h)^2.
  dw = jax.lax.dot_general(g, jnp.square(r), ((lead, lead), ((), ()))).T
  da = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  return da * (2 * r), dw


relu2_matmul.defvjp(_relu2_matmul_fwd, _relu2_matmul_bwd)


class _Kernel(nn.Module):
  """A projection's kernel alone (path <name>/kernel, like nn.Dense's)."""

  shape: tuple[int, int]
  axes: tuple[str, str]
  init: Callable

  @nn.compact
  def __call__(self):
    init = nn.with_logical_partitioning(self.init, self.axes)
    return self.param("kernel", init, self.shape, jnp.float32)


class MLP(nn.Module):
  """relu² MLP of the normed stream: c_proj(relu(c_fc(norm(x)))²)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    D, dtype = self.cfg.d_model, jnp.dtype(self.cfg.dtype)
    # Tagged before the norm, so the norm's output stays the one tensor that both the
    # norm's and c_fc's backward passes keep.
    x_BxTxD = checkpoint_name(x_BxTxD, "mlp_in")
    h = dense(4 * D, ("embed", "mlp"), uniform_init(D), self.cfg, "c_fc")(rms_norm(x_BxTxD))
    h = checkpoint_name(h, "mlp_hidden")
    w = _Kernel((4 * D, D), ("mlp", "embed"), nn.initializers.zeros, name="c_proj")()
    return relu2_matmul(h.astype(dtype), w.astype(dtype))


class Block(nn.Module):
  """One transformer block; the previous loop's output can enter it two ways.

  Query injection (FLT; LT_ia at layer 0): the attention query is h_query = norm(h)
  while keys and values come from norm(x). Residual injection (FLT_res):
  x <- norm(x + h) before the block (model/variants.py has the rules). The flags are
  traced booleans, so one compiled body serves loop 0 (no h yet) and every later loop.
  `decode` is the same block in cached decoding (Attention.decode).
  """

  cfg: ModelConfig

  def setup(self):
    self.attn = Attention(self.cfg)
    self.mlp = MLP(self.cfg)

  def __call__(
    self,
    x_BxTxD,
    h_BxTxD,
    h_query_BxTxD,
    inject_query,
    inject_residual,
    cos,
    sin,
    window_left,
    segment_ids_BxT=None,
  ):
    x_BxTxD, x_normed, q_in = self._inputs(
      x_BxTxD, h_BxTxD, h_query_BxTxD, inject_query, inject_residual
    )
    attn_out = self.attn(q_in, x_normed, cos, sin, window_left, segment_ids_BxT)
    return self._residuals(x_BxTxD, attn_out)

  def decode(
    self,
    x_BxTxD,
    h_BxTxD,
    h_query_BxTxD,
    inject_query,
    inject_residual,
    cos,
    sin,
    window_left,
    slots: CacheSlots | None = None,
    keep: Callable[[dict], dict] | None = None,
    segment_ids_BxT=None,
  ):
    """The block in cached decoding: (output, this layer's cache entry); `slots`, `keep`
    and `segment_ids_BxT` as in Attention.decode (slots None: a prompt attending over
    itself)."""
    x_BxTxD, x_normed, q_in = self._inputs(
      x_BxTxD, h_BxTxD, h_query_BxTxD, inject_query, inject_residual
    )
    attn_out, entry = self.attn.decode(
      q_in, x_normed, cos, sin, window_left, slots, keep, segment_ids_BxT
    )
    return self._residuals(x_BxTxD, attn_out), entry

  def _inputs(self, x_BxTxD, h_BxTxD, h_query_BxTxD, inject_query, inject_residual):
    """(the block's stream, its norm, the attention query input) for this variant."""
    variant = self.cfg.variant
    x_BxTxD = variants.block_input(variant, constrain_activation(x_BxTxD), h_BxTxD, inject_residual)
    x_normed = rms_norm(x_BxTxD)
    return (
      x_BxTxD,
      x_normed,
      variants.attention_query(variant, x_normed, h_query_BxTxD, inject_query),
    )

  def _residuals(self, x_BxTxD, attn_out_BxTxD):
    x_BxTxD = x_BxTxD + attn_out_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(x_BxTxD)
    return constrain_activation(x_BxTxD)
