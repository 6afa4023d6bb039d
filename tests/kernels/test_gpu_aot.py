"""Ahead-of-time GPU compilation on a CPU machine: the CUDA plugin's compile-only client,
given our description of an H100 (flt_jax/gpu_targets.py), compiles our Triton kernels
forward and backward down to cubin, the cuDNN attention, and the model with each kernel.
Nothing runs: this proves XLA, Triton and cuDNN accept the programs for sm_90a, not their
speed or numerics on a GPU. Skipped without the plugin: `pip install --no-deps -r
requirements-gpu-aot.txt`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from flt_jax import aot
from flt_jax.kernels import cudnn_attention, flash_attention
from flt_jax.model import config as model_config
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.extras import installed

pytestmark = [
  pytest.mark.needs_extra,
  pytest.mark.skipif(
    not installed("jax_plugins.xla_cuda12"),
    reason="the CUDA plugin (the GPU compiler) is not installed; `pip install --no-deps -r "
    "requirements-gpu-aot.txt` to compile for GPUs ahead of time on CPU",
  ),
]
needs_cudnn = pytest.mark.skipif(
  not installed("nvidia.cudnn"),
  reason="cuDNN is not installed (nvidia-cudnn-cu12 in requirements-gpu-aot.txt); XLA "
  "builds cuDNN's attention graphs with it",
)

B, T, H, Hkv, D = 2, 256, 4, 1, 64
WINDOWS = (-1, 64)


@functools.cache
def _gpu(topology: str = "h100:1"):
  return aot.topology_devices(aot.parse_topology(topology))[0]


def _compile_attention(attention_fn, topology: str = "h100:1"):
  """Forward + backward (one vjp) of `attention_fn` compiled for one GPU of `topology`,
  the window traced as in the layer scan, segment ids included when `attention_fn`
  takes them."""
  sharding = jax.sharding.SingleDeviceSharding(_gpu(topology))
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def forward_backward(q, k, v, window, segment_ids):
    fn = functools.partial(attention_fn, window_left=window, segment_ids=segment_ids)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  args = (
    spec((B, T, H, D)),
    spec((B, T, Hkv, D)),
    spec((B, T, Hkv, D)),
    spec((), jnp.int32),
    spec((B, T), jnp.int32),
  )
  with jax.default_matmul_precision("default"):
    return jax.jit(forward_backward).lower(*args).compile()


def _triton(q, k, v, *, window_left, segment_ids):
  return flash_attention(
    q,
    k,
    v,
    window_left=window_left,
    q_segment_ids_BxT=segment_ids,
    kv_segment_ids_BxS=segment_ids,
    lowering="triton",
    interpret=False,
  )


def _cudnn(q, k, v, *, window_left, segment_ids):
  del segment_ids  # cuDNN through jax.nn takes none
  return cudnn_attention(q, k, v, window_left=window_left, windows=WINDOWS)


@pytest.mark.parametrize("topology, arch", [("h100:1", b"sm_90a"), ("a100:1", b"sm_80")])
def test_triton_kernels_compile_to_cubin(topology, arch):
  compiled = _compile_attention(_triton, topology)
  calls = aot.attention_kernel_calls(compiled.as_text())
  assert calls == {
    ("Triton flash", "flt_flash_fwd"): 1,
    ("Triton flash", "flt_flash_dq"): 1,
    ("Triton flash", "flt_flash_dkv"): 1,
  }
  binary = compiled.runtime_executable().serialize()
  assert b"\x7fELF" in binary and arch in binary  # machine code for the target, not PTX


@needs_cudnn
def test_cudnn_attention_compiles_with_one_kernel_per_window():
  calls = aot.attention_kernel_calls(_compile_attention(_cudnn).as_text())
  assert calls == {
    ("cuDNN fmha", "fmhaSoftmax"): len(WINDOWS),
    ("cuDNN fmha", "fmhaSoftmaxBackward"): len(WINDOWS),
  }


def _model_cfg(impl: str, remat: str) -> model_config.ModelConfig:
  c = model_config.get_config()
  c.update(
    vocab_size=128,
    n_layer=2,
    d_model=128,
    n_head=2,
    n_kv_head=1,
    seq_len=T,
    window_pattern="SL",
    dtype="bfloat16",
    attention_impl=impl,
    remat=remat,
    loops=2,
  )
  return model_config.ModelConfig.from_config(c).for_devices([_gpu()])


def compiled_model_calls(cfg) -> dict:
  """Attention kernel calls in the compiled loss gradient of a model (layer scan, loop
  scan, remat as configured) for one device of cfg's platform."""
  model = LoopedTransformer(cfg)
  sharding = jax.sharding.SingleDeviceSharding(_gpu())
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding)
  params = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, 1)["params"], tokens)
  params = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding), nn.meta.unbox(params)
  )

  def loss(p, tokens_BxT):
    return jnp.mean(model.apply({"params": p}, tokens_BxT, cfg.loops).astype(jnp.float32))

  with jax.default_matmul_precision("default"):
    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return dict(aot.attention_kernel_calls(compiled.as_text()))


@needs_cudnn
def test_the_model_compiles_with_cudnn_in_every_layer():
  # auto on a GPU target is cuDNN (bf16, no segment ids). FLT, two loops scanned, two
  # layers scanned (an S window and a full one), remat per block.
  calls = compiled_model_calls(_model_cfg("auto", "block"))
  families = {family for family, _ in calls}
  assert families == {"cuDNN fmha"}, calls
  assert calls[("cuDNN fmha", "fmhaSoftmaxBackward")] == len(WINDOWS)


def test_the_model_compiles_with_triton_flash():
  calls = compiled_model_calls(_model_cfg("pallas", "loop"))
  assert {family for family, _ in calls} == {"Triton flash"}, calls
  assert {kernel for _, kernel in calls} == {"flt_flash_fwd", "flt_flash_dq", "flt_flash_dkv"}
