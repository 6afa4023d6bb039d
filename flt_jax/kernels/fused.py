"""The platforms' fused attention kernels behind the `attend` signature.

- splash attention (TPU, `jax.experimental.pallas.ops.tpu.splash_attention`): a causal or
  local (causal + left window) mask, GQA through splash's MHA kernel with fewer kv heads,
  segment ids, vmapped over the batch.
- cuDNN flash attention (GPU, `jax.nn.dot_product_attention(implementation="cudnn")`):
  causal with a left window; no segment ids.

Both take the mask as static data, while the model's window arrives traced from the
layer scan. So they build one kernel per value in `windows` (the static set of windows
the model uses) and `lax.switch` on the traced value; a window known at trace time
needs no `windows`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flt_jax.kernels.flash import UnsupportedAttentionError

SPLASH_BLOCK = 512  # default splash block (query, key/value; forward and backward)
SPLASH_BLOCK_MULTIPLE = 128


def _static_int(x) -> int | None:
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


def dispatch_on_window(name: str, window_left, windows, make_fn):
  """Calls make_fn(static_window)() for the traced `window_left` by switching over `windows`."""
  static = _static_int(window_left)
  if static is not None:
    return make_fn(static)()
  windows = tuple(sorted({int(w) for w in windows}))
  if not windows:
    raise UnsupportedAttentionError(
      f"{name} attention bakes the window into the kernel, but window_left is traced and no "
      f"static set of windows was given; pass options.windows (the model passes its layers' "
      f"window sizes) or use attention_impl='pallas', which takes a traced window"
    )
  if len(windows) == 1:
    return make_fn(windows[0])()
  index = jnp.argmax(jnp.asarray(windows, jnp.int32) == jnp.asarray(window_left, jnp.int32))
  return jax.lax.switch(index, [make_fn(w) for w in windows])


def _require_zero_offset(name: str, q_offset) -> None:
  if _static_int(q_offset) != 0:
    raise UnsupportedAttentionError(
      f"{name} attention supports only q_offset=0 (self-attention over the whole sequence); "
      f"got {q_offset!r}. Use attention_impl='pallas' or 'xla' for offset queries"
    )


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# Not cached: the kernel holds its mask tables as arrays, which are the tracers of the
# trace that builds it (the model is traced for init, for the step, under remat), so a
# kernel kept across traces leaks them. Splash caches the mask processing itself.
def _splash_kernel(num_heads: int, seq_len: int, window: int, bq: int, bk: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (seq_len, seq_len)
  if window < 0:
    head_mask = splash.CausalMask(shape)
  else:  # causal and at most window - 1 keys back: LocalMask's (left, right) = (w - 1, 0)
    head_mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  mask = splash.MultiHeadMask([head_mask] * num_heads)
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(
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
  windows: tuple[int, ...] = (),
  interpret: bool = False,
):
  """Splash attention (TPU) with the `attend` contract; interpret=True runs it on CPU."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  _require_zero_offset("splash", q_offset)
  precision = jax.config.jax_default_matmul_precision
  if q_BxTxHxD.dtype == jnp.bfloat16 and precision not in (None, "default", "bfloat16"):
    # Splash leaves its matmul precision unset, so the global setting reaches Mosaic, which
    # rejects fp32 contractions of bf16 operands (when the kernel is lowered, not here).
    raise UnsupportedAttentionError(
      f"splash attention on bfloat16 inputs cannot run under "
      f"jax_default_matmul_precision={precision!r}; leave it unset (or wrap the jit in "
      f"jax.default_matmul_precision('default')), or use attention_impl='pallas'"
    )
  B, T, H, D = q_BxTxHxD.shape
  S = k_BxSxHkvxD.shape[1]
  if S != T:
    raise UnsupportedAttentionError(
      f"splash attention here needs as many keys as queries (self-attention); got T={T}, S={S}"
    )
  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    if block % SPLASH_BLOCK_MULTIPLE:
      raise UnsupportedAttentionError(
        f"splash {name}={block} must be a multiple of {SPLASH_BLOCK_MULTIPLE} (or 0)"
      )
  Tp = _round_up(T, SPLASH_BLOCK_MULTIPLE)
  bq, bk = min(block_q or SPLASH_BLOCK, Tp), min(block_kv or SPLASH_BLOCK, Tp)
  Tp = _round_up(Tp, np.lcm(bq, bk))
  # Splash does not scale the logits: fold 1/sqrt(D) into the queries (as MaxText does).
  q_scaled = (q_BxTxHxD * (1.0 / np.sqrt(D))).astype(q_BxTxHxD.dtype)
  # Padding keys sit after every real query, so the causal mask hides them from real rows.
  pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q_scaled, k_BxSxHkvxD, v_BxSxHkvxD))
  segments = None
  if q_segment_ids_BxT is not None:
    # Padding rows form their own segment so that no row is fully masked.
    q_seg, kv_seg = (
      jnp.pad(s.astype(jnp.int32), [(0, 0), (0, Tp - T)], constant_values=-1)
      for s in (q_segment_ids_BxT, kv_segment_ids_BxS)
    )
    segments = splash.SegmentIds(q=q_seg, kv=kv_seg)

  def make(window):
    kernel = _splash_kernel(H, Tp, window, bq, bk, interpret)
    segs = {} if segments is None else {"segment_ids": segments}

    return lambda: jax.vmap(kernel)(q, k, v, **segs)

  o = dispatch_on_window("splash", window_left, windows, make)
  return o.transpose(0, 2, 1, 3)[:, :T].astype(q_BxTxHxD.dtype)


def cudnn_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  windows: tuple[int, ...] = (),
  implementation: str = "cudnn",
):
  """cuDNN flash attention (GPU) with the `attend` contract.

  implementation="xla" sends the same call through jax.nn.dot_product_attention's XLA
  path, which checks the argument mapping on machines without a GPU.
  """
  _require_zero_offset("cudnn", q_offset)
  if q_segment_ids_BxT is not None or kv_segment_ids_BxS is not None:
    raise UnsupportedAttentionError(
      "cudnn attention through jax.nn.dot_product_attention takes no segment ids; use "
      "attention_impl='pallas' for packed documents"
    )
  if implementation == "cudnn" and q_BxTxHxD.dtype not in (jnp.bfloat16, jnp.float16):
    raise UnsupportedAttentionError(
      f"cudnn flash attention needs bfloat16 or float16 inputs; got {q_BxTxHxD.dtype} "
      "(set model.dtype='bfloat16', or use attention_impl='pallas' or 'xla')"
    )

  def make(window):
    local = None if window < 0 else (window - 1, 0)
    return lambda: jax.nn.dot_product_attention(
      q_BxTxHxD,
      k_BxSxHkvxD,
      v_BxSxHkvxD,
      is_causal=True,
      local_window_size=local,
      implementation=implementation,
    )

  return dispatch_on_window("cudnn", window_left, windows, make)
