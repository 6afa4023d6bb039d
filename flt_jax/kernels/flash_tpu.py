"""TPU (Mosaic) lowering of the flash-attention kernels.

Layouts: q, o, dO [B, Hkv, G, T, D] (the G query heads that share a kv head sit in one
block, so each key/value block is fetched once for all of them: GQA without repeating K
and V); k, v, dK, dV [B, Hkv, S, D]; log-sum-exp and delta [B, Hkv, G, T] float32 rows.
T and S are already padded to multiples of the blocks.

The grid's last axis walks kv blocks (forward, dQ) or query blocks (dK/dV) sequentially
with accumulators in VMEM scratch. The window and query offset arrive as scalar-prefetch
operands in SMEM, so the index maps compute, per query block, the first and last kv
block with a visible key: step j fetches block first + j, clamped to the last one, and
steps past the last do nothing (their index is unchanged, so no DMA is issued, and
`pl.when` skips the compute). Fully visible blocks take an unmasked path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flt_jax.kernels import block_math as bm

LANES = 128  # running max / denominator are kept lane-replicated, as Mosaic prefers


@dataclasses.dataclass(frozen=True)
class TpuPlan:
  block_q: int
  block_kv: int
  kv_len: int  # true key length (keys at or past it are padding)
  has_segments: bool
  window_bound: int | None  # static window when known (shrinks the grid), else None
  interpret: bool
  scale: float
  precision: jax.lax.Precision | None
  vmem_limit_bytes: int | None = None


# VMEM each kernel needs, in bytes, for G query heads per kv head, blocks (bq, bk), head
# dim D and input itemsize: double-buffered blocks, scratch, and `temps` live [bq, bk] float32
# temporaries (fitted to Mosaic's allocation for v5e at G in {1, 4, 8}, blocks 256-1024,
# bf16 and f32, with margin). float32 inputs use HIGHEST-precision matmuls, which Mosaic
# splits into bf16 passes with up to ~1.7x the VMEM.
def vmem_bytes(G: int, bq: int, bk: int, D: int, itemsize: int) -> int:
  """The largest VMEM need of the forward, dQ and dK/dV kernels."""
  D = -(-D // LANES) * LANES  # VMEM pads the head dim to whole lanes
  rows = max(G, 8) * bq * 4  # an f32 [G, bq] row block pads G to 8 sublanes
  scores = bq * bk * 4
  fwd = 4 * G * bq * D * itemsize + 4 * bk * D * itemsize + G * bq * (2 * LANES + D) * 4
  fwd += 2 * rows + 3 * scores
  dq = 6 * G * bq * D * itemsize + 4 * bk * D * itemsize + G * bq * D * 4 + 4 * rows
  dq += 3 * scores
  dkv = 4 * G * bq * D * itemsize + 8 * bk * D * itemsize + 2 * bk * D * 4 + 4 * rows
  dkv += 4 * scores
  need = max(fwd, dq, dkv)
  return need * 7 // 4 if itemsize == 4 else need


def _compiler_params(plan: TpuPlan):
  return pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
    vmem_limit_bytes=plan.vmem_limit_bytes,
  )


def _ranges(plan: TpuPlan, num_q_blocks: int):
  kw = dict(block_q=plan.block_q, block_kv=plan.block_kv, kv_len=plan.kv_len)
  kv_range = functools.partial(bm.kv_block_range, **kw)
  kv_full = functools.partial(bm.unmasked_kv_blocks, **kw)
  q_range = functools.partial(bm.q_block_range, num_q_blocks=num_q_blocks, **kw)
  q_full = functools.partial(bm.unmasked_q_blocks, **kw)
  return kv_range, kv_full, q_range, q_full


def _mask(plan: TpuPlan, q_pos, k_pos, window, q_seg, kv_seg):
  mask = bm.visible(
    q_pos, k_pos, window, plan.kv_len, check_kv_len=plan.kv_len % plan.block_kv != 0
  )
  if plan.has_segments:
    mask = mask & (q_seg == kv_seg)
  return mask


def forward(q5, k4, v4, scalars, q_seg_col, kv_seg_row, plan: TpuPlan):
  """(o [B, Hkv, G, T, D], lse [B, Hkv, G, T] float32)."""
  B, Hkv, G, T, D = q5.shape
  S = k4.shape[2]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = T // bq, S // bk
  steps = bm.max_kv_steps(plan.window_bound, block_q=bq, block_kv=bk, num_kv_blocks=nk)
  kv_range, kv_full, _, _ = _ranges(plan, nq)

  def kv_block(qi, j, scalars_ref):
    first, last = kv_range(qi, scalars_ref[0], scalars_ref[1])
    return jnp.minimum(first + j, last)

  def kernel(scalars_ref, q_ref, k_ref, v_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    else:
      o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    qi, j = pl.program_id(2), pl.program_id(3)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = kv_range(qi, window, q_offset)
    kv = first + j

    @pl.when(j == 0)
    def _init():
      m_scr[...] = jnp.full(m_scr.shape, bm.MASK_VALUE, jnp.float32)
      l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(masked: bool):
      k, v = k_ref[...], v_ref[...]
      mask = None
      if masked:
        q_pos = q_offset + qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = kv * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        segs = (q_seg_ref[...], kv_seg_ref[...]) if plan.has_segments else (None, None)
        mask = _mask(plan, q_pos, k_pos, window, *segs)
      for g in range(G):
        m_next, l_next, acc_next = bm.softmax_step(
          q_ref[g],
          k,
          v,
          m_scr[g][:, :1],
          l_scr[g][:, :1],
          acc_scr[g],
          mask,
          scale=plan.scale,
          precision=plan.precision,
        )
        m_scr[g] = jnp.broadcast_to(m_next, (bq, LANES))
        l_scr[g] = jnp.broadcast_to(l_next, (bq, LANES))
        acc_scr[g] = acc_next

    run = kv <= last
    if plan.has_segments:
      pl.when(run)(lambda: update(masked=True))
    else:
      full_first, full_last = kv_full(qi, window, q_offset)
      full = (kv >= full_first) & (kv <= full_last)
      pl.when(run & full)(lambda: update(masked=False))
      pl.when(run & jnp.logical_not(full))(lambda: update(masked=True))

    @pl.when(j == steps - 1)
    def _finish():
      for g in range(G):
        m, l = m_scr[g], l_scr[g]
        o, _ = bm.finish_softmax(m[:, :1], l[:, :1], acc_scr[g])
        o_ref[g] = o.astype(o_ref.dtype)
        # [bq, LANES] lane-replicated -> one [bq] row: a transpose Mosaic tiles natively.
        lse_ref[g] = jnp.transpose(m + jnp.log(l))[0]

  q_spec = pl.BlockSpec((None, None, G, bq, D), lambda b, h, qi, j, s: (b, h, 0, qi, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, qi, j, s: (b, h, kv_block(qi, j, s), 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q5, k4, v4]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, bq, 1), lambda b, h, qi, j, s: (b, qi, 0)),
      pl.BlockSpec((None, 1, bk), lambda b, h, qi, j, s: (b, 0, kv_block(qi, j, s))),
    ]
    args += [q_seg_col, kv_seg_row]
  out_specs = [q_spec, pl.BlockSpec((None, None, G, bq), lambda b, h, qi, j, s: (b, h, 0, qi))]
  return pl.pallas_call(
    kernel,
    out_shape=[
      jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      jax.ShapeDtypeStruct((B, Hkv, G, T), jnp.float32),
    ],
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(B, Hkv, nq, steps),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[
        pltpu.VMEM((G, bq, LANES), jnp.float32),
        pltpu.VMEM((G, bq, LANES), jnp.float32),
        pltpu.VMEM((G, bq, D), jnp.float32),
      ],
    ),
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_fwd",
  )(scalars, *args)


def backward_dq(q5, k4, v4, do5, lse4, delta4, scalars, q_seg_col, kv_seg_row, plan: TpuPlan):
  """dQ [B, Hkv, G, T, D]: query blocks in parallel, kv blocks walked sequentially."""
  B, Hkv, G, T, D = q5.shape
  S = k4.shape[2]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = T // bq, S // bk
  steps = bm.max_kv_steps(plan.window_bound, block_q=bq, block_kv=bk, num_kv_blocks=nk)
  kv_range, kv_full, _, _ = _ranges(plan, nq)

  def kv_block(qi, j, scalars_ref):
    first, last = kv_range(qi, scalars_ref[0], scalars_ref[1])
    return jnp.minimum(first + j, last)

  def kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, dq_ref, dq_scr = rest
    else:
      dq_ref, dq_scr = rest
    qi, j = pl.program_id(2), pl.program_id(3)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = kv_range(qi, window, q_offset)
    kv = first + j

    @pl.when(j == 0)
    def _init():
      dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def update(masked: bool):
      k, v = k_ref[...], v_ref[...]
      mask = None
      if masked:
        q_pos = q_offset + qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = kv * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        segs = (q_seg_ref[...], kv_seg_ref[...]) if plan.has_segments else (None, None)
        mask = _mask(plan, q_pos, k_pos, window, *segs)
      for g in range(G):
        dq_scr[g] += bm.dq_step(
          q_ref[g],
          k,
          v,
          do_ref[g],
          lse_ref[g][:, None],
          delta_ref[g][:, None],
          mask,
          scale=plan.scale,
          precision=plan.precision,
        )

    run = kv <= last
    if plan.has_segments:
      pl.when(run)(lambda: update(masked=True))
    else:
      full_first, full_last = kv_full(qi, window, q_offset)
      full = (kv >= full_first) & (kv <= full_last)
      pl.when(run & full)(lambda: update(masked=False))
      pl.when(run & jnp.logical_not(full))(lambda: update(masked=True))

    @pl.when(j == steps - 1)
    def _finish():
      dq_ref[...] = (dq_scr[...] * plan.scale).astype(dq_ref.dtype)

  q_spec = pl.BlockSpec((None, None, G, bq, D), lambda b, h, qi, j, s: (b, h, 0, qi, 0))
  row_spec = pl.BlockSpec((None, None, G, bq), lambda b, h, qi, j, s: (b, h, 0, qi))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, qi, j, s: (b, h, kv_block(qi, j, s), 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [q5, k4, v4, do5, lse4, delta4]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, bq, 1), lambda b, h, qi, j, s: (b, qi, 0)),
      pl.BlockSpec((None, 1, bk), lambda b, h, qi, j, s: (b, 0, kv_block(qi, j, s))),
    ]
    args += [q_seg_col, kv_seg_row]
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(B, Hkv, nq, steps),
      in_specs=in_specs,
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((G, bq, D), jnp.float32)],
    ),
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_dq",
  )(scalars, *args)


def backward_dkv(q5, k4, v4, do5, lse4, delta4, scalars, q_seg_row, kv_seg_col, plan: TpuPlan):
  """(dK, dV) [B, Hkv, S, D]: kv blocks in parallel, query blocks (all G heads) walked
  sequentially, so the GQA sum over query heads happens in VMEM."""
  B, Hkv, G, T, D = q5.shape
  S = k4.shape[2]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = T // bq, S // bk
  steps = bm.max_q_steps(plan.window_bound, block_q=bq, block_kv=bk, num_q_blocks=nq)
  _, _, q_range, q_full = _ranges(plan, nq)

  def q_block(ki, j, scalars_ref):
    first, last = q_range(ki, scalars_ref[0], scalars_ref[1])
    return jnp.clip(jnp.minimum(first + j, last), 0, nq - 1)

  def kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
    if plan.has_segments:
      q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    else:
      dk_ref, dv_ref, dk_scr, dv_scr = rest
    ki, j = pl.program_id(2), pl.program_id(3)
    window, q_offset = scalars_ref[0], scalars_ref[1]
    first, last = q_range(ki, window, q_offset)
    qb = first + j

    @pl.when(j == 0)
    def _init():
      dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
      dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def update(masked: bool):
      k, v = k_ref[...], v_ref[...]
      mask_t = None
      if masked:
        k_pos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
        q_pos = q_offset + qb * bq + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        segs = (q_seg_ref[...], kv_seg_ref[...]) if plan.has_segments else (None, None)
        mask_t = _mask(plan, q_pos, k_pos, window, *segs)
      dk, dv = dk_scr[...], dv_scr[...]
      for g in range(G):
        dk_g, dv_g = bm.dkv_step(
          q_ref[g],
          k,
          v,
          do_ref[g],
          lse_ref[pl.ds(g, 1), :],
          delta_ref[pl.ds(g, 1), :],
          mask_t,
          scale=plan.scale,
          precision=plan.precision,
        )
        dk, dv = dk + dk_g, dv + dv_g
      dk_scr[...], dv_scr[...] = dk, dv

    run = qb <= last
    if plan.has_segments:
      pl.when(run)(lambda: update(masked=True))
    else:
      full_first, full_last = q_full(ki, window, q_offset)
      full = (qb >= full_first) & (qb <= full_last)
      pl.when(run & full)(lambda: update(masked=False))
      pl.when(run & jnp.logical_not(full))(lambda: update(masked=True))

    @pl.when(j == steps - 1)
    def _finish():
      dk_ref[...] = (dk_scr[...] * plan.scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

  q_spec = pl.BlockSpec(
    (None, None, G, bq, D), lambda b, h, ki, j, s: (b, h, 0, q_block(ki, j, s), 0)
  )
  row_spec = pl.BlockSpec((None, None, G, bq), lambda b, h, ki, j, s: (b, h, 0, q_block(ki, j, s)))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, ki, j, s: (b, h, ki, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [q5, k4, v4, do5, lse4, delta4]
  if plan.has_segments:
    in_specs += [
      pl.BlockSpec((None, 1, bq), lambda b, h, ki, j, s: (b, 0, q_block(ki, j, s))),
      pl.BlockSpec((None, bk, 1), lambda b, h, ki, j, s: (b, ki, 0)),
    ]
    args += [q_seg_row, kv_seg_col]
  return pl.pallas_call(
    kernel,
    out_shape=[
      jax.ShapeDtypeStruct(k4.shape, k4.dtype),
      jax.ShapeDtypeStruct(v4.shape, v4.dtype),
    ],
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(B, Hkv, nk, steps),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
    ),
    compiler_params=_compiler_params(plan),
    interpret=plan.interpret,
    name="flt_flash_dkv",
  )(scalars, *args)
