"""The GPU (Triton) kernels lower for CUDA on a CPU machine.

Lowering for the "cuda" platform runs Pallas' Triton lowering, which emits each kernel's
Triton IR into the program; this catches shapes and ops Triton cannot express. Turning
that IR into PTX (and running it) needs a GPU and is not checked here.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from flt_jax.kernels import flash_attention

B, H, Hkv = 1, 8, 2


@pytest.mark.parametrize(
  "T, D, dtype, with_segments",
  [(4096, 128, jnp.bfloat16, True), (1000, 64, jnp.float32, False)],
  ids=["T4096-D128-bf16-seg", "T1000-D64-f32"],
)
def test_triton_kernels_lower_for_cuda(T, D, dtype, with_segments):
  def forward_backward(q, k, v, window, segment_ids):
    segs = (
      dict(q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids) if with_segments else {}
    )
    fn = functools.partial(
      flash_attention, window_left=window, lowering="triton", interpret=False, **segs
    )
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  args = (
    spec((B, T, H, D)),
    spec((B, T, Hkv, D)),
    spec((B, T, Hkv, D)),
    spec((), jnp.int32),
    spec((B, T), jnp.int32),
  )
  text = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3
  for kernel in ("flt_flash_fwd", "flt_flash_dq", "flt_flash_dkv"):
    assert f'name = "{kernel}"' in text
