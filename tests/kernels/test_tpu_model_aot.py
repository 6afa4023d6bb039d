"""The model compiled for a TPU on a CPU machine with each TPU kernel inside it: splash
(which `auto` picks on TPU) and our Mosaic flash attention, in full-context and
sliding-window layers, under remat and the loop and layer scans. libtpu's compile-only
client gives the TPU; the custom calls are counted in the compiled HLO. Skipped without
libtpu (`pip install -r requirements-tpu.txt`)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flt_jax import aot
from flt_jax.model import config as model_config
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.extras import needs

pytestmark = needs("libtpu", "requirements-tpu.txt", "compiling the model for a TPU ahead of time")

B, T = 1, 512


@functools.cache
def _tpu():
  return aot.topology_devices(aot.parse_topology("v5e:2x2"))[0]


def _compiled_calls(impl: str, remat: str, window_pattern: str) -> dict:
  # tests/conftest.py asks for "highest" matmuls; bf16 kernels run at the default.
  with jax.default_matmul_precision("default"):
    return _compile(impl, remat, window_pattern)


def _compile(impl: str, remat: str, window_pattern: str) -> dict:
  c = model_config.get_config()
  c.update(
    vocab_size=128,
    n_layer=2,
    d_model=256,
    n_head=2,
    n_kv_head=1,
    seq_len=T,
    window_pattern=window_pattern,
    dtype="bfloat16",
    attention_impl=impl,
    remat=remat,
    loops=2,
  )
  cfg = model_config.ModelConfig.from_config(c).for_devices([_tpu()])
  model = LoopedTransformer(cfg)
  sharding = jax.sharding.SingleDeviceSharding(_tpu())
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding)
  params = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, 1)["params"], tokens)
  params = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding), nn.meta.unbox(params)
  )

  def loss(p, tokens_BxT):
    return jnp.mean(model.apply({"params": p}, tokens_BxT, cfg.loops).astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return dict(aot.attention_kernel_calls(compiled.as_text()))


def test_auto_compiles_splash_into_windowed_and_full_layers():
  calls = _compiled_calls("auto", "block", "SL")
  assert {family for family, _ in calls} == {"splash"}, calls
  # Each window (S, L) has its own forward, dq and dkv kernel.
  assert sum(n for (_, kernel), n in calls.items() if "dkv" in kernel) == 2, calls


def test_our_mosaic_kernels_compile_into_the_model():
  calls = _compiled_calls("pallas", "loop", "SL")
  assert {kernel for _, kernel in calls} == {"flt_flash_fwd", "flt_flash_dq", "flt_flash_dkv"}
  assert {family for family, _ in calls} == {"Mosaic flash"}, calls
