"""GPU (Triton) lowering of the flash-attention kernels.

Triton programs are independent, so each program owns one output block and walks the
blocks it reduces over in an in-kernel `fori_loop` whose bounds come from the window and
query offset read from a small int32 operand: out-of-window and above-diagonal blocks are
never loaded. The loop is split into masked edge ranges and an unmasked middle range.

Layouts stay as the model produces them: q, o, dO [B, T, H, D]; k, v, dK, dV [B, S, Hkv, D];
log-sum-exp and delta [B, H, T] float32. A program for query head h reads kv head
h // G (GQA without repeated keys); the dK/dV program of a kv head loops over its G
query heads, so their sum needs no atomics. T and S are padded to the blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from flt_jax.kernels import block_math as bm


@dataclasses.dataclass(frozen=True)
class GpuPlan:
  block_q: int
  block_kv: int
  kv_len: int
  has_segments: bool
  interpret: bool
  scale: float
  precision: jax.lax.Precision | None
  num_warps: int = 4
  num_stages: int = 2


def _compiler_params(plan: GpuPlan):
  return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _mask(plan: GpuPlan, q_pos, k_pos, window, q_seg, kv_seg):
  mask = bm.visible(
    q_pos, k_pos, window, plan.kv_len, check_kv_len=plan.kv_len % plan.block_kv != 0
  )
  if plan.has_segments:
    mask = mask & (q_seg == kv_seg)
  return mask


def _split(first, last, full_first, full_last, has_segments: bool):
  """Loop bounds: masked [first, a), unmasked [a, b), masked [b, last]."""
  stop = last + 1
  if has_segments:
    return stop, stop
  a = jnp.clip(full_first, first, stop)
  b = jnp.clip(full_last + 1, a, stop)
  return a, b


def _loop(first, a, b, stop, step, carry):
  carry = jax.lax.fori_loop(first, a, functools.partial(step, True), carry)
  carry = jax.lax.fori_loop(a, b, functools.partial(step, False), carry)
  return jax.lax.fori_loop(b, stop, functools.partial(step, True), carry)


def _kw(plan: GpuPlan):
  return dict(block_q=plan.block_q, block_kv=plan.block_kv, kv_len=plan.kv_len)


def forward(q, k, v, scalars, q_seg, kv_seg, plan: GpuPlan):
  """(o [B, T, H, D], lse [B, H, T] float32)."""
  B, T, H, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = H // Hkv
  bq, bk = plan.block_q, plan.block_kv
  nq = T // bq

  def kernel(scalars_ref, q_ref, k_ref, v_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, o_ref, lse_ref = rest
    else:
      o_ref, lse_ref = rest
    qi = pl.program_id(0)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = bm.kv_block_range(qi, window, q_offset, **_kw(plan))
    full_first, full_last = bm.unmasked_kv_blocks(qi, window, q_offset, **_kw(plan))
    a, b = _split(first, last, full_first, full_last, plan.has_segments)
    q_blk = q_ref[...]
    q_pos = q_offset + qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    q_ids = q_seg_ref[...][:, None] if plan.has_segments else None

    def step(masked, kv, carry):
      start = pl.multiple_of(kv * bk, bk)
      k_blk, v_blk = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
      mask = None
      if masked:
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kv_ids = kv_seg_ref[pl.ds(start, bk)][None, :] if plan.has_segments else None
        mask = _mask(plan, q_pos, k_pos, window, q_ids, kv_ids)
      return bm.softmax_step(
        q_blk, k_blk, v_blk, *carry, mask, scale=plan.scale, precision=plan.precision
      )

    init = (
      jnp.full((bq, 1), bm.MASK_VALUE, jnp.float32),
      jnp.zeros((bq, 1), jnp.float32),
      jnp.zeros((bq, D), jnp.float32),
    )
    m, l, acc = _loop(first, a, b, last + 1, step, init)
    o, lse = bm.finish_softmax(m, l, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]

  in_specs = [
    pl.BlockSpec((2,), lambda qi, b, h: (0,)),
    pl.BlockSpec((None, bq, None, D), lambda qi, b, h: (b, qi, h, 0)),
    pl.BlockSpec((None, S, None, D), lambda qi, b, h: (b, 0, h // G, 0)),
    pl.BlockSpec((None, S, None, D), lambda qi, b, h: (b, 0, h // G, 0)),
  ]
  args = [scalars, q, k, v]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, bq), lambda qi, b, h: (b, qi)),
      pl.BlockSpec((None, S), lambda qi, b, h: (b, 0)),
    ]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
    kernel,
    grid=(nq, B, H),
    in_specs=in_specs,
    out_specs=[
      pl.BlockSpec((None, bq, None, D), lambda qi, b, h: (b, qi, h, 0)),
      pl.BlockSpec((None, None, bq), lambda qi, b, h: (b, h, qi)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((B, H, T), jnp.float32),
    ],
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_fwd",
  )(*args)


def backward_dq(q, k, v, do, lse, delta, scalars, q_seg, kv_seg, plan: GpuPlan):
  """dQ [B, T, H, D]."""
  B, T, H, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = H // Hkv
  bq, bk = plan.block_q, plan.block_kv
  nq = T // bq

  def kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, dq_ref = rest
    else:
      (dq_ref,) = rest
    qi = pl.program_id(0)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = bm.kv_block_range(qi, window, q_offset, **_kw(plan))
    full_first, full_last = bm.unmasked_kv_blocks(qi, window, q_offset, **_kw(plan))
    a, b = _split(first, last, full_first, full_last, plan.has_segments)
    q_blk, do_blk = q_ref[...], do_ref[...]
    lse_col, delta_col = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = q_offset + qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    q_ids = q_seg_ref[...][:, None] if plan.has_segments else None

    def step(masked, kv, dq):
      start = pl.multiple_of(kv * bk, bk)
      k_blk, v_blk = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
      mask = None
      if masked:
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kv_ids = kv_seg_ref[pl.ds(start, bk)][None, :] if plan.has_segments else None
        mask = _mask(plan, q_pos, k_pos, window, q_ids, kv_ids)
      return dq + bm.dq_step(
        q_blk,
        k_blk,
        v_blk,
        do_blk,
        lse_col,
        delta_col,
        mask,
        scale=plan.scale,
        precision=plan.precision,
      )

    dq = _loop(first, a, b, last + 1, step, jnp.zeros((bq, D), jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)

  q_spec = pl.BlockSpec((None, bq, None, D), lambda qi, b, h: (b, qi, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda qi, b, h: (b, 0, h // G, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda qi, b, h: (b, h, qi))
  in_specs = [pl.BlockSpec((2,), lambda qi, b, h: (0,)), q_spec, kv_spec, kv_spec]
  in_specs += [q_spec, row_spec, row_spec]
  args = [scalars, q, k, v, do, lse, delta]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, bq), lambda qi, b, h: (b, qi)),
      pl.BlockSpec((None, S), lambda qi, b, h: (b, 0)),
    ]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
    kernel,
    grid=(nq, B, H),
    in_specs=in_specs,
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_dq",
  )(*args)


def backward_dkv(q, k, v, do, lse, delta, scalars, q_seg, kv_seg, plan: GpuPlan):
  """(dK, dV) [B, S, Hkv, D]; one program per kv block and kv head sums its G query heads."""
  B, T, H, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = H // Hkv
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = T // bq, S // bk

  def kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, dk_ref, dv_ref = rest
    else:
      dk_ref, dv_ref = rest
    ki = pl.program_id(0)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = bm.q_block_range(ki, window, q_offset, num_q_blocks=nq, **_kw(plan))
    full_first, full_last = bm.unmasked_q_blocks(ki, window, q_offset, **_kw(plan))
    a, b = _split(first, last, full_first, full_last, plan.has_segments)
    k_blk, v_blk = k_ref[...], v_ref[...]
    k_pos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    kv_ids = kv_seg_ref[...][:, None] if plan.has_segments else None

    def head_step(g, masked, qb, carry):
      start = pl.multiple_of(qb * bq, bq)
      mask_t = None
      if masked:
        q_pos = q_offset + start + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        q_ids = q_seg_ref[pl.ds(start, bq)][None, :] if plan.has_segments else None
        mask_t = _mask(plan, q_pos, k_pos, window, q_ids, kv_ids)
      dk_g, dv_g = bm.dkv_step(
        q_ref[pl.ds(start, bq), g, :],
        k_blk,
        v_blk,
        do_ref[pl.ds(start, bq), g, :],
        lse_ref[g, pl.ds(start, bq)][None, :],
        delta_ref[g, pl.ds(start, bq)][None, :],
        mask_t,
        scale=plan.scale,
        precision=plan.precision,
      )
      return carry[0] + dk_g, carry[1] + dv_g

    carry = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
    for g in range(G):
      carry = _loop(first, a, b, last + 1, functools.partial(head_step, g), carry)
    dk_ref[...] = (carry[0] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)

  group_spec = pl.BlockSpec((None, T, G, D), lambda ki, b, h: (b, 0, h, 0))
  group_rows = pl.BlockSpec((None, G, T), lambda ki, b, h: (b, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, D), lambda ki, b, h: (b, ki, h, 0))
  in_specs = [pl.BlockSpec((2,), lambda ki, b, h: (0,)), group_spec, kv_spec, kv_spec]
  in_specs += [group_spec, group_rows, group_rows]
  args = [scalars, q, k, v, do, lse, delta]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, T), lambda ki, b, h: (b, 0)),
      pl.BlockSpec((None, bk), lambda ki, b, h: (b, ki)),
    ]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
    kernel,
    grid=(nk, B, Hkv),
    in_specs=in_specs,
    out_specs=[kv_spec, kv_spec],
    out_shape=[
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
    ],
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_dkv",
  )(*args)
