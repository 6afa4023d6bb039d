"""Building blocks of the reference architecture (arXiv:2605.18797, official code): weightless
RMSNorm, rotary embedding, MHA/GQA and MLA attention, relu² MLP, and the block with the
three ways the previous loop's output can enter it.

Tensors that a remat policy may save by name (`config.model.remat_policy`) are tagged
with `jax.ad_checkpoint.checkpoint_name`: "qkv" (the q, k, v projections), "attn_out"
(attention output before c_proj), "mlp_in" (the stream entering the MLP, before its norm),
"mlp_hidden" (c_fc's output before relu²).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flt_jax.model import attention
from flt_jax.model.config import ModelConfig

_EPS = float(np.finfo(np.float32).eps)  # the reference's F.rms_norm default for float32
# Logical axes of an activation [B, T, D]; a no-op until the mesh code installs rules.
ACTIVATION_AXES = ("batch", "length", "act_embed")


def constrain_activation(x_BxTxD):
  """Lets a sharding rules table place the [B, T, D] stream (identity without one)."""
  return nn.with_logical_constraint(x_BxTxD, ACTIVATION_AXES)


@jax.custom_vjp
def _rms_norm32(x32):
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _EPS)


def _rms_norm32_fwd(x32):
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _EPS)
  y = x32 * r
  # Only the output (which the next matmul keeps anyway) and the [..., 1] scale are
  # kept for the backward pass, not the input: less to store per layer and loop.
  return y, (y, r)


def _rms_norm32_bwd(res, g):
  y, r = res
  return (r * (g - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_rms_norm32.defvjp(_rms_norm32_fwd, _rms_norm32_bwd)


def rms_norm(x):
  """RMSNorm without learnable scale, computed in float32, returned in x's dtype."""
  return _rms_norm32(x.astype(jnp.float32)).astype(x.dtype)


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


class Attention(nn.Module):
  """Causal self-attention whose queries may come from another stream (injection).

  With kv_lora_rank > 0 (MLA) keys and values come from norm(c_kv_down(x)). Sliding
  windows apply to MLA as well; the reference's MLA ignores its window (always full
  context), so MLA checkpoints with 'S' layers are not interchangeable with it.
  segment_ids_BxT (packed documents) keeps attention within each document.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, q_in_BxTxD, kv_in_BxTxD, cos, sin, window_left, segment_ids_BxT=None):
    cfg = self.cfg
    B, T, _ = q_in_BxTxD.shape
    H, Hkv, hd, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    zeros = nn.initializers.zeros
    q = dense(H * hd, ("embed", "heads"), uniform_init(D), cfg, "c_q")(q_in_BxTxD)
    if cfg.kv_lora_rank:
      r = cfg.kv_lora_rank
      c_kv = rms_norm(
        dense(r, ("embed", "kv_lora"), uniform_init(D), cfg, "c_kv_down")(kv_in_BxTxD)
      )
      k = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_k_up")(c_kv)
      v = dense(Hkv * hd, ("kv_lora", "kv_heads"), uniform_init(r), cfg, "c_v_up")(c_kv)
    else:
      k = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_k")(kv_in_BxTxD)
      v = dense(Hkv * hd, ("embed", "kv_heads"), uniform_init(D), cfg, "c_v")(kv_in_BxTxD)
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    q_BxTxHxD = rms_norm(apply_rope(q.reshape(B, T, H, hd), cos, sin))
    k_BxTxHkvxD = rms_norm(apply_rope(k.reshape(B, T, Hkv, hd), cos, sin))
    compute = jnp.dtype(cfg.dtype)
    y_BxTxHxD = attention.attend(
      q_BxTxHxD.astype(compute),
      k_BxTxHkvxD.astype(compute),
      v.reshape(B, T, Hkv, hd).astype(compute),
      window_left=window_left,
      impl=cfg.attention_impl,
      options=cfg.attention_options,
      q_segment_ids_BxT=segment_ids_BxT,
      kv_segment_ids_BxS=segment_ids_BxT,
    )
    y_BxTxHxD = checkpoint_name(y_BxTxHxD, "attn_out")
    return dense(D, ("heads", "embed"), zeros, cfg, "c_proj")(y_BxTxHxD.reshape(B, T, H * hd))


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
  x <- norm(x + h) before the block. The flags are traced booleans, so one compiled
  body serves loop 0 (no h yet) and every later loop.
  """

  cfg: ModelConfig

  @nn.compact
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
    x_BxTxD = constrain_activation(x_BxTxD)
    if self.cfg.variant == "FLT_res":
      x_BxTxD = jnp.where(inject_residual, rms_norm(x_BxTxD + h_BxTxD), x_BxTxD)
    x_normed = rms_norm(x_BxTxD)
    q_in = x_normed
    if self.cfg.variant in ("FLT", "LT_ia"):
      q_in = jnp.where(inject_query, h_query_BxTxD, x_normed)
    attn = Attention(self.cfg, name="attn")
    x_BxTxD = x_BxTxD + attn(q_in, x_normed, cos, sin, window_left, segment_ids_BxT)
    x_BxTxD = x_BxTxD + MLP(self.cfg, name="mlp")(x_BxTxD)
    return constrain_activation(x_BxTxD)
