"""Ahead-of-time TPU compilation of the attention kernels on a CPU machine.

libtpu's compile-only client (`jax.experimental.topologies.get_topology_desc`) gives TPU
devices to lower and compile for without TPU hardware. The forward and backward kernels
(ours and splash) must compile for v5e and v6e at T=4096, head dim 128, bfloat16, with a
traced sliding window and GQA 4:1, segment ids included. Nothing runs: this proves Mosaic
accepts the kernels (tiling, layouts, VMEM), not their speed or numerics on hardware.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from flt_jax.kernels import flash_attention, splash_attention
from tests.helpers.extras import needs

pytestmark = needs("libtpu", "requirements-tpu.txt", "compiling the TPU kernels ahead of time")

B, T, H, Hkv, D = 1, 4096, 8, 2, 128
WINDOW_CHOICES = (-1, 1024)


@functools.cache
def _device(topology: str):
  from jax.experimental import topologies

  return topologies.get_topology_desc(topology, "tpu").devices[0]


def _compiled_hlo(topology: str, attention) -> str:
  """Compiles forward + backward (one vjp) for one TPU of `topology`; returns its HLO."""
  sharding = jax.sharding.SingleDeviceSharding(_device(topology))
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def forward_backward(q, k, v, window, segment_ids):
    fn = functools.partial(
      attention, window_left=window, q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids
    )
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  args = (
    spec((B, T, H, D)),
    spec((B, T, Hkv, D)),
    spec((B, T, Hkv, D)),
    spec((), jnp.int32),
    spec((B, T), jnp.int32),
  )
  # tests/conftest.py asks for "highest" matmuls; bf16 kernels run at the default.
  with jax.default_matmul_precision("default"):
    return jax.jit(forward_backward).lower(*args).compile().as_text()


def _kernel_names(hlo: str) -> list[str]:
  return sorted(set(re.findall(r"jit\(forward_backward\)/[^\"]*?(\w+)/pallas_call", hlo)))


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_pallas_kernels_compile_for_tpu(topology):
  ours = functools.partial(flash_attention, lowering="mosaic_tpu", interpret=False)
  hlo = _compiled_hlo(topology, ours)
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 3
  for kernel in ("flt_flash_fwd", "flt_flash_dq", "flt_flash_dkv"):
    assert kernel in hlo, f"{kernel} missing from the compiled program"


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_splash_compiles_for_tpu(topology):
  splash = functools.partial(splash_attention, windows=WINDOW_CHOICES)
  hlo = _compiled_hlo(topology, splash)
  # One forward, dq and dkv kernel per window choice.
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 3 * len(WINDOW_CHOICES)
