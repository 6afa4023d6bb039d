"""config.model.attention_impl -> the implementation `attend` runs on each platform, and
clear errors for choices the platform cannot run (never a silent fallback)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.errors import ConfigError
from flt_jax.model import attention
from flt_jax.model import config as model_config


def _qkv(dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, 16, 2, 64), dtype)
  k = jax.random.normal(keys[1], (1, 16, 1, 64), dtype)
  v = jax.random.normal(keys[2], (1, 16, 1, 64), dtype)
  return q, k, v


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_impl_the_cpu_cannot_run_names_what_it_can(impl):
  with pytest.raises(ValueError, match=r"cannot run on this platform \(cpu\).*xla, pallas"):
    attention.attend(*_qkv(), window_left=-1, impl=impl)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown"):
    attention.attend(*_qkv(), window_left=-1, impl="flash3")


def test_auto_on_cpu_is_xla():
  q, k, v = _qkv()
  auto = attention.attend(q, k, v, window_left=4, impl="auto")
  np.testing.assert_array_equal(auto, attention.xla_attention(q, k, v, window_left=4))


def test_pallas_on_cpu_interprets_and_matches_xla():
  q, k, v = _qkv()
  ours = attention.attend(q, k, v, window_left=4, impl="pallas")
  np.testing.assert_allclose(ours, attention.xla_attention(q, k, v, window_left=4), atol=2e-5)


@pytest.mark.parametrize(
  "platform, kw, expected",
  [
    ("tpu", {}, "splash"),
    ("tpu", dict(has_segments=True), "splash"),
    ("tpu", dict(has_offset=True), "pallas"),
    ("gpu", {}, "cudnn"),
    ("gpu", dict(float32=True), "pallas"),
    ("gpu", dict(has_segments=True), "pallas"),
    ("tpu", dict(windows_known=False), "pallas"),
    ("gpu", dict(windows_known=False), "pallas"),
    ("cpu", dict(has_segments=True), "xla"),
  ],
)
def test_auto_table(monkeypatch, platform, kw, expected):
  monkeypatch.setattr(attention, "current_platform", lambda: platform)
  assert attention.resolve_impl("auto", **kw) == expected


@pytest.mark.parametrize(
  "platform, impl, ok",
  [
    ("tpu", "splash", True),
    ("tpu", "cudnn", False),
    ("gpu", "cudnn", True),
    ("gpu", "splash", False),
    ("gpu", "pallas", True),
  ],
)
def test_platform_table(monkeypatch, platform, impl, ok):
  monkeypatch.setattr(attention, "current_platform", lambda: platform)
  if ok:
    assert attention.resolve_impl(impl) == impl
  else:
    with pytest.raises(ValueError, match=f"cannot run on this platform \\({platform}\\)"):
      attention.resolve_impl(impl)


def test_config_accepts_every_impl_and_checks_block_sizes():
  for impl in model_config.ATTENTION_IMPLS:
    c = model_config.get_config()
    c.update(vocab_size=32, attention_impl=impl)
    model_config.ModelConfig.from_config(c)
  c = model_config.get_config()
  c.update(vocab_size=32, attention_impl="flash")
  with pytest.raises(ConfigError, match="attention_impl"):
    model_config.ModelConfig.from_config(c)
  c = model_config.get_config()
  c.update(vocab_size=32, attention_block_q=-128)
  with pytest.raises(ConfigError, match="attention_block_q"):
    model_config.ModelConfig.from_config(c)


def test_attention_options_carry_blocks_and_the_layers_windows():
  c = model_config.get_config()
  c.update(vocab_size=32, n_layer=4, seq_len=256, window_pattern="SSL", attention_block_q=256)
  options = model_config.ModelConfig.from_config(c).attention_options
  assert options == attention.KernelOptions(block_q=256, block_kv=0, windows=(-1, 64))
  hash(options)  # static: usable as a jit / scan constant
