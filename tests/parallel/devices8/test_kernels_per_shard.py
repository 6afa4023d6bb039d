"""Attention kernels under a mesh of 8 simulated devices run per shard (shard_map over the
batch and head axes): the same numbers as XLA attention on the whole arrays, with no
gather of the operands. Our Pallas kernel runs interpreted here (CPU), as its Mosaic and
Triton lowerings would on each TPU or GPU of a mesh."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flt_jax.model import attention
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import sharding


def test_pallas_per_shard_matches_xla_without_gathering():
  c = parallel_config.get_config()
  c.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(c)
  rules = sharding.logical_rules(c)
  B, T, H, Hkv, D = 4, 128, 4, 2, 16
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32)
  k = jax.random.normal(keys[1], (B, T, Hkv, D), jnp.float32)
  v = jax.random.normal(keys[2], (B, T, Hkv, D), jnp.float32)
  segments = jnp.asarray(np.repeat([[0] * 70 + [1] * 58], B, axis=0), jnp.int32)
  options = attention.KernelOptions(windows=(-1, 32), platform="cpu")
  heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))

  def attend(impl):
    def fn(q, k, v, segments, window):
      return attention.attend(
        q,
        k,
        v,
        window_left=window,
        impl=impl,
        q_segment_ids_BxT=segments,
        kv_segment_ids_BxS=segments,
        options=options,
      )

    in_shardings = (heads, heads, heads, rows, sharding.replicated(mesh))
    return sharding.sharded_jit(fn, mesh, rules, in_shardings, heads)

  args = (q, k, v, segments, jnp.int32(32))
  ours = attend("pallas")
  np.testing.assert_allclose(ours(*args), attend("xla")(*args), atol=2e-5)
  hlo = ours.lower(*args).compile().as_text()
  assert "all-gather" not in hlo
  assert "sdy.manual_computation" in ours.lower(*args).as_text()  # shard_map's region
  assert nn.get_logical_axis_rules() == ()  # the rules applied only inside the jit
