"""Flash attention of our own in Pallas: causal, sliding window, GQA, segment ids.

`flash_attention` has the signature of the model's `attend` implementations. Forward:
online softmax over key/value blocks with float32 accumulation, skipping every block that
the causal mask or the left window hides entirely. Backward (`jax.custom_vjp`): recomputes
the probabilities from the saved log-sum-exp; one kernel produces dQ, another dK and dV.

Two lowerings of the same block math (`block_math.py`):
  - "mosaic_tpu" (`flash_tpu.py`): a sequential grid over the reduced axis with VMEM
    accumulators; the window reaches the index maps through scalar prefetch.
  - "triton" (`flash_gpu.py`): one program per output block and an in-kernel loop whose
    bounds depend on the window.
On CPU both run with `interpret=True` (Pallas' interpreter; slow, for tests); `lowering`
defaults to the target platform's (`lowering_for`: TPU mosaic_tpu, GPU triton, CPU
mosaic_tpu interpreted). The caller names the target (the model passes the platform its
program is compiled for); the default backend stands in only when it does not.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flt_jax.kernels import block_math as bm
from flt_jax.kernels import flash_gpu, flash_tpu

LOWERINGS = ("mosaic_tpu", "triton")
# Default (block_q, block_kv) per lowering when the config leaves them at 0.
DEFAULT_BLOCKS = {"mosaic_tpu": (512, 512), "triton": (64, 64)}
# Mosaic tiles the last two dims of a block by (8, 128): query/key blocks must be
# multiples of 128 (they are the lane dimension of the score, lse and segment-id tiles).
TPU_BLOCK_MULTIPLE = 128
# Triton tensors have power-of-two shapes; tl.dot needs every dim >= 16.
TRITON_MIN_BLOCK = 16
# Default TPU blocks shrink until the kernels' VMEM estimate fits this budget, inside the
# 16 MiB of scoped VMEM that XLA grants a custom call by default on every TPU generation.
# Larger explicit blocks set the kernels' VMEM limit to their estimate instead; XLA must
# then allow it: LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=<more> (v5e/v6e have
# 128 MiB of VMEM, v5p 64 MiB, v4 16 MiB).
TPU_VMEM_BUDGET = 12 * 2**20


class UnsupportedAttentionError(ValueError):
  """A shape, dtype or option that this kernel cannot run, with what would work."""


def lowering_for(platform: str) -> tuple[str, bool]:
  """(lowering, interpret) for a target platform: TPU and GPU compile, CPU interprets."""
  if platform == "tpu":
    return "mosaic_tpu", False
  if platform in ("gpu", "cuda", "rocm"):
    return "triton", False
  return "mosaic_tpu", True


def default_lowering() -> tuple[str, bool]:
  """(lowering, interpret) for the default backend (when the caller names no target)."""
  return lowering_for(jax.default_backend())


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def check_head_dim(head_dim: int, lowering: str) -> None:
  """Raises UnsupportedAttentionError when `lowering` cannot tile this head dimension.

  Mosaic takes any head dim as a full-width block (checked by compiling 4 to 256, odd
  sizes included; multiples of 128 fill the lanes best). Triton needs a power of two.
  """
  if lowering == "triton" and not (_is_pow2(head_dim) and 16 <= head_dim <= 256):
    raise UnsupportedAttentionError(
      f"pallas attention on GPU (Triton) needs a power-of-two head_dim in [16, 256]; got "
      f"head_dim={head_dim}. Change d_model/n_head, or use attention_impl='xla'"
    )


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def choose_blocks(lowering: str, seq_len: int, block: int, which: str) -> int:
  """The block size used for a sequence of `seq_len`: `block` (0 = lowering default),
  shrunk to the padded sequence when the sequence is shorter; checked against the tiling."""
  requested = block or DEFAULT_BLOCKS[lowering][0 if which == "block_q" else 1]
  if lowering == "mosaic_tpu":
    if requested % TPU_BLOCK_MULTIPLE:
      raise UnsupportedAttentionError(
        f"attention {which}={requested} does not tile on TPU: use a multiple of "
        f"{TPU_BLOCK_MULTIPLE} (or 0 for the default)"
      )
    return min(requested, _round_up(seq_len, TPU_BLOCK_MULTIPLE))
  if not _is_pow2(requested) or requested < TRITON_MIN_BLOCK:
    raise UnsupportedAttentionError(
      f"attention {which}={requested} does not tile with Triton: use a power of two >= "
      f"{TRITON_MIN_BLOCK} (or 0 for the default)"
    )
  return min(requested, max(TRITON_MIN_BLOCK, _next_pow2(seq_len)))


def tpu_blocks(T: int, S: int, G: int, D: int, itemsize: int, block_q: int, block_kv: int):
  """(block_q, block_kv, vmem_limit_bytes) for the Mosaic kernels."""
  bq = choose_blocks("mosaic_tpu", T, block_q, "block_q")
  bk = choose_blocks("mosaic_tpu", S, block_kv, "block_kv")
  while flash_tpu.vmem_bytes(G, bq, bk, D, itemsize) > TPU_VMEM_BUDGET:
    if not block_q and bq > TPU_BLOCK_MULTIPLE:
      bq //= 2
    elif not block_kv and bk > TPU_BLOCK_MULTIPLE:
      bk //= 2
    else:
      break
  need = flash_tpu.vmem_bytes(G, bq, bk, D, itemsize)
  return bq, bk, (TPU_VMEM_BUDGET + 2 * 2**20 if need <= TPU_VMEM_BUDGET else need + need // 4)


def _static_window(window_left) -> int | None:
  """The window as a Python int when it is known at trace time, else None."""
  if isinstance(window_left, (int, np.integer)):
    return int(window_left)
  try:
    return int(window_left)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


def _check_inputs(q, k, v, q_segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise UnsupportedAttentionError(
      f"expected q [B, T, H, D] and k, v [B, S, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}"
    )
  B, _, H, D = q.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
    raise UnsupportedAttentionError(
      f"k and v must be [B, S, Hkv, D] with Hkv dividing H={H}; got q {q.shape}, "
      f"k {k.shape}, v {v.shape}"
    )
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise UnsupportedAttentionError(
      f"q, k, v must share one dtype, float32 or bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}"
    )
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise UnsupportedAttentionError("give both q_segment_ids_BxT and kv_segment_ids_BxS or none")
  if q_segment_ids is not None and (
    q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]
  ):
    raise UnsupportedAttentionError(
      f"segment ids must be [B, T] and [B, S]; got {q_segment_ids.shape} and "
      f"{kv_segment_ids.shape} for q {q.shape}, k {k.shape}"
    )


def flash_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  block_q: int = 0,
  block_kv: int = 0,
  lowering: str | None = None,
  interpret: bool | None = None,
):
  """Causal (optionally left-windowed) attention; same contract as `attend`.

  window_left: -1 for full context or a positive width; may be a traced int32 scalar.
  block_q, block_kv: block sizes (0 = the lowering's default), see `choose_blocks`.
  lowering: "mosaic_tpu" or "triton" (None = the default backend's); interpret: run
  Pallas' interpreter instead of compiling (None = when the default backend is the CPU).
  """
  _check_inputs(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, q_segment_ids_BxT, kv_segment_ids_BxS)
  default, default_interpret = default_lowering()
  if lowering not in (None, *LOWERINGS):
    raise UnsupportedAttentionError(f"lowering={lowering!r}; choose one of {LOWERINGS}")
  interpret = default_interpret if interpret is None else interpret
  lowering = lowering or default
  B, T, H, D = q_BxTxHxD.shape
  S, Hkv = k_BxSxHkvxD.shape[1], k_BxSxHkvxD.shape[2]
  check_head_dim(D, lowering)
  G = H // Hkv
  if lowering == "mosaic_tpu":
    itemsize = q_BxTxHxD.dtype.itemsize
    bq, bk, vmem_limit = tpu_blocks(T, S, G, D, itemsize, block_q, block_kv)
  else:
    bq = choose_blocks(lowering, T, block_q, "block_q")
    bk = choose_blocks(lowering, S, block_kv, "block_kv")
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  has_segments = q_segment_ids_BxT is not None
  # float32 inputs get float32 matmuls (Triton would otherwise use TF32); bfloat16 inputs
  # use the native bf16 x bf16 -> f32 path, whatever jax_default_matmul_precision says
  # (Mosaic rejects an fp32 contract precision on bf16 operands).
  precision = (
    jax.lax.Precision.HIGHEST if q_BxTxHxD.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  )
  scalars = jnp.stack(
    [bm.effective_window(window_left), jnp.asarray(q_offset, jnp.int32).reshape(())]
  )

  def pad(x, length, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value) if length != x.shape[1] else x

  q, k, v = pad(q_BxTxHxD, Tp), pad(k_BxSxHkvxD, Sp), pad(v_BxSxHkvxD, Sp)
  q_seg = kv_seg = None
  if has_segments:
    # Padding rows get ids no real row has; padded keys are also masked by position.
    q_seg = pad(q_segment_ids_BxT.astype(jnp.int32), Tp, -1)
    kv_seg = pad(kv_segment_ids_BxS.astype(jnp.int32), Sp, -2)
  scale = 1.0 / math.sqrt(D)

  if lowering == "mosaic_tpu":
    plan = flash_tpu.TpuPlan(
      block_q=bq,
      block_kv=bk,
      kv_len=S,
      has_segments=has_segments,
      window_bound=_static_window(window_left),
      interpret=interpret,
      scale=scale,
      precision=precision,
      vmem_limit_bytes=vmem_limit,
    )
    q5 = q.reshape(B, Tp, Hkv, G, D).transpose(0, 2, 3, 1, 4)
    k4, v4 = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    o5 = _tpu_attention(q5, k4, v4, scalars, q_seg, kv_seg, plan)
    o = o5.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, D)
  else:
    plan = flash_gpu.GpuPlan(
      block_q=bq,
      block_kv=bk,
      kv_len=S,
      has_segments=has_segments,
      interpret=interpret,
      scale=scale,
      precision=precision,
      num_warps=4 if D <= 64 else 8,
    )
    o = _gpu_attention(q, k, v, scalars, q_seg, kv_seg, plan)
  return o[:, :T]


def _delta(o, do, axis=-1):
  """rowsum(dO * O) in float32: the softmax-backward correction term."""
  return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=axis)


# --- TPU layout: q [B, Hkv, G, T, D], k/v [B, Hkv, S, D] ------------------------------------


def _tpu_segments(q_seg, kv_seg):
  if q_seg is None:
    return None, None, None, None
  B = q_seg.shape[0]
  return q_seg[:, :, None], kv_seg.reshape(B, 1, -1), q_seg.reshape(B, 1, -1), kv_seg[:, :, None]


def _tpu_forward(q5, k4, v4, scalars, q_seg, kv_seg, plan):
  q_col, kv_row, _, _ = _tpu_segments(q_seg, kv_seg)
  o5, lse4 = flash_tpu.forward(q5, k4, v4, scalars, q_col, kv_row, plan)
  return o5, (q5, k4, v4, scalars, q_seg, kv_seg, o5, lse4)


def _tpu_backward(plan, residuals, do5):
  q5, k4, v4, scalars, q_seg, kv_seg, o5, lse4 = residuals
  delta4 = _delta(o5, do5)
  q_col, kv_row, q_row, kv_col = _tpu_segments(q_seg, kv_seg)
  dq5 = flash_tpu.backward_dq(q5, k4, v4, do5, lse4, delta4, scalars, q_col, kv_row, plan)
  dk4, dv4 = flash_tpu.backward_dkv(q5, k4, v4, do5, lse4, delta4, scalars, q_row, kv_col, plan)
  return dq5, dk4, dv4, None, None, None


def _tpu_attention_impl(q5, k4, v4, scalars, q_seg, kv_seg, plan):
  return _tpu_forward(q5, k4, v4, scalars, q_seg, kv_seg, plan)[0]


_tpu_attention = jax.custom_vjp(_tpu_attention_impl, nondiff_argnums=(6,))
_tpu_attention.defvjp(_tpu_forward, _tpu_backward)


# --- GPU layout: q [B, T, H, D], k/v [B, S, Hkv, D] -----------------------------------------


def _gpu_forward(q, k, v, scalars, q_seg, kv_seg, plan):
  o, lse = flash_gpu.forward(q, k, v, scalars, q_seg, kv_seg, plan)
  return o, (q, k, v, scalars, q_seg, kv_seg, o, lse)


def _gpu_backward(plan, residuals, do):
  q, k, v, scalars, q_seg, kv_seg, o, lse = residuals
  delta = _delta(o, do).transpose(0, 2, 1)  # [B, H, T] like lse
  dq = flash_gpu.backward_dq(q, k, v, do, lse, delta, scalars, q_seg, kv_seg, plan)
  dk, dv = flash_gpu.backward_dkv(q, k, v, do, lse, delta, scalars, q_seg, kv_seg, plan)
  return dq, dk, dv, None, None, None


def _gpu_attention_impl(q, k, v, scalars, q_seg, kv_seg, plan):
  return _gpu_forward(q, k, v, scalars, q_seg, kv_seg, plan)[0]


_gpu_attention = jax.custom_vjp(_gpu_attention_impl, nondiff_argnums=(6,))
_gpu_attention.defvjp(_gpu_forward, _gpu_backward)
