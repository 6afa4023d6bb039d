"""The attention kernel follows the devices a program is compiled for, not the host:
ModelConfig.for_devices sets the target platform, `attend` and the flash lowering read it,
and the run's first line says what was chosen. Runs on the CPU alone (lowering for CUDA
needs no GPU and no plugin; cuDNN's lowering does, see test_gpu_aot.py)."""

import re
import types

import jax
import jax.numpy as jnp
import pytest

from flt_jax.errors import ConfigError
from flt_jax.model import attention
from flt_jax.model import config as model_config


def _cfg(**overrides) -> model_config.ModelConfig:
  c = model_config.get_config()
  c.update(vocab_size=64, **overrides)
  return model_config.ModelConfig.from_config(c)


def _devices(*platforms):
  return [types.SimpleNamespace(platform=p) for p in platforms]


def test_platform_of_names_cuda_and_rocm_gpu_and_refuses_a_mix():
  assert attention.platform_of(_devices("cuda", "cuda")) == "gpu"
  assert attention.platform_of(_devices("rocm")) == "gpu"
  assert attention.platform_of(_devices("tpu")) == "tpu"
  with pytest.raises(ValueError, match=r"mix platforms \['cpu', 'gpu'\]"):
    attention.platform_of(_devices("cpu", "gpu"))


def test_the_target_is_no_config_field_and_for_devices_sets_it():
  assert "platform" not in model_config.get_config()
  c = model_config.get_config()
  c.update(vocab_size=64, platform="gpu")
  with pytest.raises(ConfigError, match=r"\['platform'\] is invalid: has unknown keys"):
    model_config.ModelConfig.from_config(c)
  cfg = _cfg(attention_impl="cudnn", dtype="bfloat16")
  assert cfg.platform == "" and cfg.attention_options.platform == ""
  gpu = cfg.for_devices(_devices("cuda", "cuda"))
  assert gpu.platform == "gpu" and gpu.attention_options.platform == "gpu"
  assert gpu != cfg  # a model for another target is another static config
  config_values = lambda m: {f.name: getattr(m, f.name) for f in model_config.config_fields()}
  assert config_values(gpu) == config_values(cfg)  # what a checkpoint saves is unchanged


def test_a_kernel_the_target_cannot_run_is_a_config_error_naming_the_field():
  cfg = _cfg(attention_impl="cudnn", dtype="bfloat16")
  with pytest.raises(ConfigError, match=r"config.model.attention_impl='cudnn'.*cannot run on tpu"):
    cfg.for_platform("tpu")
  with pytest.raises(ConfigError, match=r"cannot run on cpu.*'xla', 'pallas'"):
    cfg.for_devices(_devices("cpu"))
  assert _cfg(attention_impl="splash").for_platform("tpu").platform == "tpu"


@pytest.mark.parametrize(
  "platform, overrides, line",
  [
    ("gpu", dict(attention_impl="auto", dtype="bfloat16"), "attention: auto -> cudnn (gpu: cuDNN"),
    (
      "gpu",
      dict(attention_impl="auto"),
      "attention: auto -> pallas (gpu; cudnn cannot take float32",
    ),
    (
      "gpu",
      dict(attention_impl="auto", dtype="bfloat16", separate_documents=True),
      "attention: auto -> pallas (gpu; cudnn cannot take segment ids",
    ),
    ("tpu", dict(attention_impl="auto"), "attention: auto -> splash (tpu: TPU splash"),
    ("cpu", dict(attention_impl="auto"), "attention: auto -> xla (cpu: plain XLA)"),
    ("gpu", dict(attention_impl="pallas"), "attention: pallas (gpu: our Pallas flash attention)"),
  ],
)
def test_describe_attention_names_the_choice_for_the_target(platform, overrides, line):
  assert _cfg(**overrides).for_platform(platform).describe_attention().startswith(line)


def _qkv_specs(dtype=jnp.bfloat16, T=128):
  return (
    jax.ShapeDtypeStruct((1, T, 4, 64), dtype),
    jax.ShapeDtypeStruct((1, T, 1, 64), dtype),
    jax.ShapeDtypeStruct((1, T, 1, 64), dtype),
  )


def _lowered_for(platform: str, impl: str, dtype=jnp.bfloat16) -> str:
  """attend's forward and backward lowered for `platform` on this CPU host, with the
  window traced (as in the layer scan) and the model's static set of windows."""
  options = attention.KernelOptions(windows=(-1, 32), platform=platform)

  def forward_backward(q, k, v, window):
    fn = lambda q, k, v: attention.attend(q, k, v, window_left=window, impl=impl, options=options)
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(out)

  args = (*_qkv_specs(dtype), jax.ShapeDtypeStruct((), jnp.int32))
  lowering = {"gpu": "cuda"}.get(platform, platform)
  with jax.default_matmul_precision("default"):
    traced = jax.jit(forward_backward).trace(*args)
  return traced.lower(lowering_platforms=(lowering,)).as_text()


def test_pallas_for_a_gpu_target_lowers_triton_kernels_from_a_cpu_host():
  # Before: the host's backend (cpu) chose the interpreted Mosaic kernel.
  text = _lowered_for("gpu", "pallas")
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3
  assert "flt_flash_dq" in text and "tpu_custom_call" not in text


def test_pallas_for_a_tpu_target_lowers_mosaic_kernels_from_a_cpu_host():
  text = _lowered_for("tpu", "pallas")
  assert len(re.findall(r"custom_call @tpu_custom_call", text)) == 3


def test_the_same_call_on_the_host_still_runs_there():
  # No target named: the default backend (cpu) decides, as direct calls always did.
  q, k, v = (jnp.ones(s.shape, jnp.float32) for s in _qkv_specs())
  out = attention.attend(q, k, v, window_left=-1, impl="auto")
  assert out.shape == q.shape
