"""Causal (optionally sliding-window) attention behind one function.

The model calls `attend` only; a fused kernel (e.g. Pallas) registers itself in
`_IMPLS` under a name that `config.model.attention_impl` selects.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def causal_window_mask(q_positions_T, k_positions_S, window_left):
  """[T, S] bool: key visible to query. window_left < 0 means full causal context."""
  delta = q_positions_T[:, None] - k_positions_S[None, :]
  in_window = jnp.where(window_left < 0, True, delta < window_left)
  return (delta >= 0) & in_window


def xla_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
):
  """Plain XLA attention with GQA, softmax in float32, scale 1/sqrt(head_dim).

  window_left may be a traced int32 scalar (it comes from the scanned layer axis).
  q_offset is the absolute position of the first query (for cached decoding).
  With segment ids, a query sees only keys of its own segment (packed documents).
  """
  B, T, H, D = q_BxTxHxD.shape
  S, Hkv = k_BxSxHkvxD.shape[1], k_BxSxHkvxD.shape[2]
  G = H // Hkv
  q_BxTxHkvxGxD = q_BxTxHxD.reshape(B, T, Hkv, G, D)
  logits_BxHkvxGxTxS = jnp.einsum(
    "btkgd,bskd->bkgts", q_BxTxHkvxGxD, k_BxSxHkvxD, preferred_element_type=jnp.float32
  ) / math.sqrt(D)
  mask_BxTxS = causal_window_mask(jnp.arange(T) + q_offset, jnp.arange(S), window_left)[None]
  if q_segment_ids_BxT is not None:
    same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    mask_BxTxS = mask_BxTxS & same_BxTxS
  logits_BxHkvxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxHkvxGxTxS, -jnp.inf)
  probs = jax.nn.softmax(logits_BxHkvxGxTxS, axis=-1).astype(v_BxSxHkvxD.dtype)
  out_BxTxHkvxGxD = jnp.einsum(
    "bkgts,bskd->btkgd", probs, v_BxSxHkvxD, preferred_element_type=jnp.float32
  )
  return out_BxTxHkvxGxD.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)


_IMPLS = {"xla": xla_attention}


def register(name: str, fn) -> None:
  _IMPLS[name] = fn


def attend(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  impl="xla",
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
):
  """q: [B, T, H, D]; k, v: [B, S, Hkv, D] with Hkv dividing H. Returns [B, T, H, D].

  Every implementation takes these arguments: causal attention, a left window
  (`window_left` >= 0, or -1 for full context), query positions offset by `q_offset`, and
  optional segment ids (int [B, T] and [B, S]; attention stays within equal ids).
  """
  if impl not in _IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {sorted(_IMPLS)}")
  return _IMPLS[impl](
    q_BxTxHxD,
    k_BxSxHkvxD,
    v_BxSxHkvxD,
    window_left=window_left,
    q_offset=q_offset,
    q_segment_ids_BxT=q_segment_ids_BxT,
    kv_segment_ids_BxS=kv_segment_ids_BxS,
  )
