"""Block arithmetic and per-block math shared by the TPU and GPU flash-attention kernels.

Visibility rule (the same as the XLA reference): key position k is visible to query
position q when k <= q (causal), q - k < window (left window; a full-context layer uses
FULL_WINDOW), k < kv_len (keys past the true length are padding), and, with segment ids,
both carry the same id. Query positions are `q_offset + row`.

The range helpers take int32 scalars (traced inside kernels and index maps) and return the
kv blocks a query block must visit (or the query blocks a kv block must visit): every block
outside the range has no visible pair and is skipped, not masked. Blocks inside the
"unmasked" sub-range are fully visible and need no mask at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A large finite negative logit for masked entries: exp(MASK_VALUE - m) underflows to 0
# while MASK_VALUE - MASK_VALUE stays 0 (no NaN when a whole block row is masked).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The effective window of a full-context layer: wider than any sequence, small enough that
# position arithmetic on it stays inside int32.
FULL_WINDOW = 1 << 30


def effective_window(window_left):
  """window_left (-1 = full context, else a positive width; may be traced) -> int32 width."""
  window = jnp.asarray(window_left, jnp.int32)
  return jnp.where(window < 0, jnp.int32(FULL_WINDOW), window)


def _div(x, d: int):
  """x // d for x >= 0 (lax.div truncates; jnp's // would emit a sign op Mosaic lowers only
  when it can query the TPU it runs on, which ahead-of-time compilation cannot)."""
  return jax.lax.div(x, jnp.int32(d))


def _ceil_div_clamped(x, d: int):
  """ceil(max(x, 0) / d): a first block index below 0 means 0."""
  return _div(jnp.maximum(x, 0) + (d - 1), d)


def _floor_div_or_none(x, d: int):
  """floor(x / d) for x >= 0, else -1: a last block index below 0 means no block."""
  return jnp.where(x < 0, -1, _div(jnp.maximum(x, 0), d))


def kv_block_range(q_block, window, q_offset, *, block_q: int, block_kv: int, kv_len: int):
  """[first, last] kv blocks with a key visible to some query of `q_block` (last < first: none)."""
  q_first = q_offset + q_block * block_q
  q_last = q_first + block_q - 1
  first = _div(jnp.maximum(q_first - window + 1, 0), block_kv)
  last = _div(jnp.minimum(q_last, kv_len - 1), block_kv)
  return first, last


def unmasked_kv_blocks(q_block, window, q_offset, *, block_q: int, block_kv: int, kv_len: int):
  """[first, last] kv blocks whose every key every query of `q_block` sees (no mask needed)."""
  q_first = q_offset + q_block * block_q
  q_last = q_first + block_q - 1
  first = _ceil_div_clamped(q_last - window + 1, block_kv)  # inside every query's window
  last = _div(q_first + 1, block_kv) - 1  # every key at or before the first query
  last = jnp.minimum(last, kv_len // block_kv - 1)  # a block holding padding keys is masked
  return first, last


def q_block_range(
  kv_block, window, q_offset, *, block_q: int, block_kv: int, kv_len: int, num_q_blocks: int
):
  """[first, last] query blocks with a query that sees some key of `kv_block`."""
  k_first = kv_block * block_kv
  k_last = jnp.minimum(k_first + block_kv - 1, kv_len - 1)
  first = _div(jnp.maximum(k_first - q_offset, 0), block_q)
  last = jnp.minimum(_floor_div_or_none(k_last + window - 1 - q_offset, block_q), num_q_blocks - 1)
  return first, last


def unmasked_q_blocks(kv_block, window, q_offset, *, block_q: int, block_kv: int, kv_len: int):
  """[first, last] query blocks in which every query sees every key of `kv_block`."""
  k_first = kv_block * block_kv
  k_last = k_first + block_kv - 1
  first = _ceil_div_clamped(k_last - q_offset, block_q)  # every query at or after the last key
  last = _floor_div_or_none(k_first + window - q_offset - block_q, block_q)  # inside the window
  has_padding = k_last >= kv_len
  return first, jnp.where(has_padding, -1, last)


def max_kv_steps(window_bound: int | None, *, block_q: int, block_kv: int, num_kv_blocks: int):
  """Static bound on how many kv blocks one query block visits, given a static window bound."""
  if window_bound is None or window_bound < 0:
    return num_kv_blocks
  return min(num_kv_blocks, (window_bound + block_q - 2) // block_kv + 2)


def max_q_steps(window_bound: int | None, *, block_q: int, block_kv: int, num_q_blocks: int):
  """Static bound on how many query blocks one kv block is visited by."""
  if window_bound is None or window_bound < 0:
    return num_q_blocks
  return min(num_q_blocks, (window_bound + block_kv - 2) // block_q + 2)


def visible(q_pos, k_pos, window, kv_len: int, *, check_kv_len: bool):
  """Boolean visibility of broadcastable int32 query and key positions."""
  ok = (k_pos <= q_pos) & (q_pos - k_pos < window)
  if check_kv_len:
    ok = ok & (k_pos < kv_len)
  return ok


def dot_nt(a, b, precision):
  """a @ b.T with float32 accumulation."""
  return jax.lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def dot_nn(a, b, precision):
  """a @ b with float32 accumulation."""
  return jax.lax.dot_general(
    a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def softmax_step(q, k, v, m_prev, l_prev, acc_prev, mask, *, scale: float, precision):
  """One online-softmax update of a [bq, D] query block with a [bk, D] key/value block.

  m_prev and l_prev are [bq, 1] (running max and denominator), acc_prev [bq, D] float32.
  mask is a [bq, bk] bool or None (a fully visible block).
  """
  s = dot_nt(q, k, precision) * scale
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_next)
  alpha = jnp.exp(m_prev - m_next)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_next = alpha * acc_prev + dot_nn(p.astype(v.dtype), v, precision)
  return m_next, l_next, acc_next


def finish_softmax(m, l, acc):
  """(output [bq, D] float32, log-sum-exp [bq, 1]); rows that saw no key give 0 output."""
  l_safe = jnp.where(l == 0.0, 1.0, l)
  return acc / l_safe, m + jnp.log(l)


def dq_step(q, k, v, do, lse, delta, mask, *, scale: float, precision):
  """dS @ K for one block (unscaled); lse and delta are [bq, 1] columns."""
  s = dot_nt(q, k, precision) * scale
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.exp(s - lse)
  dp = dot_nt(do, v, precision)
  ds = p * (dp - delta)
  return dot_nn(ds.astype(k.dtype), k, precision)


def dkv_step(q, k, v, do, lse_row, delta_row, mask_t, *, scale: float, precision):
  """(dK, dV) contributions of one block, computed transposed ([bk, bq] scores).

  lse_row and delta_row are [1, bq] rows; mask_t is the [bk, bq] transposed mask or None.
  dK is unscaled (the caller multiplies by `scale` once).
  """
  s_t = dot_nt(k, q, precision) * scale
  if mask_t is not None:
    s_t = jnp.where(mask_t, s_t, MASK_VALUE)
  p_t = jnp.exp(s_t - lse_row)
  dv = dot_nn(p_t.astype(do.dtype), do, precision)
  dp_t = dot_nt(v, do, precision)
  ds_t = p_t * (dp_t - delta_row)
  dk = dot_nn(ds_t.astype(q.dtype), q, precision)
  return dk, dv
