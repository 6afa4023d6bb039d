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


def xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, window_left, q_offset=0):
  """Plain XLA attention with GQA, softmax in float32, scale 1/sqrt(head_dim).

  window_left may be a traced int32 scalar (it comes from the scanned layer axis).
  q_offset is the absolute position of the first query (for cached decoding).
  """
  B, T, H, D = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  G = H // K
  q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, G, D)
  logits_BxKxGxTxS = jnp.einsum(
    "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
  ) / math.sqrt(D)
  mask_TxS = causal_window_mask(jnp.arange(T) + q_offset, jnp.arange(S), window_left)
  logits_BxKxGxTxS = jnp.where(mask_TxS, logits_BxKxGxTxS, -jnp.inf)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum(
    "bkgts,bskd->btkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32
  )
  return out_BxTxKxGxD.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)


_IMPLS = {"xla": xla_attention}


def register(name: str, fn) -> None:
  _IMPLS[name] = fn


def attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, window_left, impl="xla", q_offset=0):
  """q: [B, T, H, D]; k, v: [B, S, Hkv, D] with Hkv dividing H. Returns [B, T, H, D]."""
  if impl not in _IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {sorted(_IMPLS)}")
  return _IMPLS[impl](q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, window_left=window_left, q_offset=q_offset)
