"""The platforms' fused kernels behind the `attend` signature, checked on CPU where they
can be: splash in its Pallas interpreter, and the cuDNN call's arguments through
jax.nn.dot_product_attention's XLA path (cuDNN itself needs a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.kernels import UnsupportedAttentionError, cudnn_attention, splash_attention
from flt_jax.model.attention import xla_attention

B, H, Hkv, D = 2, 4, 2, 64


def _inputs(T, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  norm = lambda x: x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
  q = norm(jax.random.normal(keys[0], (B, T, H, D)))
  k = norm(jax.random.normal(keys[1], (B, T, Hkv, D)))
  v = jax.random.normal(keys[2], (B, T, Hkv, D))
  do = jax.random.normal(keys[3], (B, T, H, D))
  return q, k, v, do


def _segments(T):
  ids = np.ones((B, T), np.int32)
  ids[0, T // 3 :] = 2
  ids[1, T // 2 :] = 2
  ids[1, 3 * T // 4 :] = 3
  return jnp.asarray(ids)


def _value_and_grads(attention, q, k, v, do):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(do))


def _compare(fused, T, windows, with_segments, tol=2e-5):
  """fused and XLA, forward and gradients, at every window in `windows` (traced)."""
  seg = _segments(T)
  segs = dict(q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg) if with_segments else {}

  def both(q, k, v, do, window):
    ours = functools.partial(fused, window_left=window, windows=windows, **segs)
    ref = functools.partial(xla_attention, window_left=window, **segs)
    return _value_and_grads(ours, q, k, v, do), _value_and_grads(ref, q, k, v, do)

  q, k, v, do = _inputs(T)
  compiled = jax.jit(both).lower(q, k, v, do, jnp.int32(-1)).compile()
  for window in windows:
    ours, ref = compiled(q, k, v, do, jnp.int32(window))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
      np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=f"{name} window={window}")


def test_splash_matches_xla_with_window_gqa_and_segments():
  """T=320 pads to 384 (3 blocks of 128); the traced window switches between two kernels."""
  splash = functools.partial(splash_attention, block_q=128, block_kv=128, interpret=True)
  _compare(splash, 320, windows=(-1, 100), with_segments=True)


def test_cudnn_call_arguments_match_xla():
  """The window and GQA reach jax.nn.dot_product_attention as attend means them."""
  cudnn_via_xla = functools.partial(cudnn_attention, implementation="xla")
  _compare(cudnn_via_xla, 96, windows=(-1, 1, 17), with_segments=False)


def test_traced_window_without_static_windows_is_a_clear_error():
  q, k, v, _ = _inputs(128)
  fn = jax.jit(lambda w: cudnn_attention(q, k, v, window_left=w, implementation="xla"))
  with pytest.raises(UnsupportedAttentionError, match="window_left is traced"):
    fn(jnp.int32(4))


@pytest.mark.parametrize(
  "fused, kw, match",
  [
    (cudnn_attention, dict(q_offset=5), "q_offset=0"),
    (splash_attention, dict(q_offset=5), "q_offset=0"),
    (cudnn_attention, dict(q_segment_ids_BxT=1, kv_segment_ids_BxS=1), "no segment ids"),
    (cudnn_attention, dict(), "bfloat16 or float16"),
    (splash_attention, dict(block_q=100), "multiple of 128"),
  ],
  ids=["cudnn-offset", "splash-offset", "cudnn-segments", "cudnn-float32", "splash-block"],
)
def test_unsupported_inputs_are_clear_errors(fused, kw, match):
  q, k, v, _ = _inputs(128)
  with pytest.raises(UnsupportedAttentionError, match=match):
    fused(q, k, v, window_left=-1, **kw)


def test_splash_in_bf16_under_highest_matmul_precision_is_a_clear_error():
  """tests/conftest.py sets jax_default_matmul_precision='highest', which splash's bf16
  matmuls would pass on to Mosaic (it rejects them at compile time, cryptically)."""
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs(128))
  with pytest.raises(UnsupportedAttentionError, match="jax_default_matmul_precision"):
    splash_attention(q, k, v, window_left=-1, interpret=True)
