"""config.model validation: every invalid setting raises ValueError naming its field."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from flt_jax.model.config import ModelConfig, get_config
from flt_jax.model.looped import LoopedTransformer

SMALL = dict(n_layer=2, d_model=32, n_head=2, n_kv_head=2, vocab_size=50, seq_len=16, loops=2)


def _config(**overrides):
  c = get_config()
  c.update(SMALL)
  c.update(overrides)
  return c


def test_defaults_and_small_config_are_valid():
  assert ModelConfig.from_config(get_config(), tokenizer_vocab_size=257).vocab_size == 257
  cfg = ModelConfig.from_config(
    _config(
      window_pattern="SSL",
      kv_lora_rank=8,
      n_kv_head=1,
      loss_type="FEW",
      remat="block",
      variant="LT_ia",
    )
  )
  assert cfg.head_dim == 16 and cfg.padded_vocab_size == 64
  assert cfg.window_sizes == (4, -1)  # the last layer is forced to full context


def test_window_sizes_follow_pattern_and_last_layer_is_full():
  cfg = ModelConfig.from_config(_config(n_layer=5, window_pattern="SSL"))
  assert cfg.window_sizes == (4, 4, -1, 4, -1)
  cfg = ModelConfig.from_config(_config(n_layer=3, window_pattern="S"))
  assert cfg.window_sizes == (4, 4, -1)


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(d_model=32, n_head=3), "n_head"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_head=2, n_kv_head=4), "n_kv_head"),
    (dict(variant="FLT_ia"), "variant"),
    (dict(loss_type="MID"), "loss_type"),
    (dict(remat="everything"), "remat"),
    (dict(remat_policy="attn_out,nope"), "remat_policy"),
    (dict(window_pattern="SXL"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
    (dict(loops=0), "loops"),
    (dict(loops=-3), "loops"),
    (dict(seq_len=16, rope_max_len=8), "rope_max_len"),
    (dict(d_model=30, n_head=2), "n_head|d_model|head_dim"),  # head_dim 15 is odd
    (dict(dtype="float16"), "dtype"),
    (dict(kv_lora_rank=-1), "kv_lora_rank"),
    (dict(loop_sampling="poisson"), "loop_sampling"),
    (dict(loop_sampling="uniform", loops=4, max_loops=3), "max_loops"),
    (dict(loop_sampling="poisson_lognormal", max_loops=0), "max_loops"),
    (dict(max_loops=-1), "max_loops"),
    (dict(backprop_loops=-2), "backprop_loops"),
  ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig.from_config(_config(**overrides))


def test_max_loops_message_says_the_fix():
  with pytest.raises(ValueError) as e:
    ModelConfig.from_config(_config(loop_sampling="uniform", loops=6, max_loops=4))
  assert str(e.value) == (
    "config.model.max_loops=4 is invalid: loop_sampling='uniform' draws up to max_loops "
    "loops, which must be >= loops=6. Fix: set model.max_loops (e.g. 12)."
  )


def test_loop_count_settings_and_what_they_imply():
  fixed = ModelConfig.from_config(_config(loops=5))
  assert (fixed.windowed, fixed.max_count, fixed.gradient_window) == (False, 5, 5)
  window = ModelConfig.from_config(_config(loops=5, backprop_loops=8))  # more than run: all
  assert (window.windowed, window.gradient_window) == (True, 5)
  drawn = ModelConfig.from_config(
    _config(loops=5, loop_sampling="poisson_lognormal", max_loops=20, backprop_loops=3)
  )
  assert (drawn.windowed, drawn.max_count, drawn.gradient_window) == (True, 20, 3)


def test_unknown_key_raises_naming_it():
  c = _config()
  c.n_heads = 4  # a typo of n_head
  with pytest.raises(ValueError, match="n_heads"):
    ModelConfig.from_config(c)


def _model_and_params(**overrides):
  cfg = ModelConfig.from_config(_config(**overrides))
  model = LoopedTransformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  params = jax.tree_util.tree_map(
    lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["params"])
  )
  return model, params


def test_sequence_longer_than_rotary_table_raises_at_call():
  model, params = _model_and_params(seq_len=16, rope_max_len=16)
  out = model.apply({"params": params}, jnp.zeros((1, 16), jnp.int32), 1)  # fits exactly
  assert out.shape == (1, 16, 50)
  with pytest.raises(ValueError, match="rotary|rope_max_len"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_default_rotary_table_is_ten_times_seq_len():
  model, params = _model_and_params(seq_len=4)
  assert model.cfg.rope_table_len == 40
  with pytest.raises(ValueError, match="rotary|rope_max_len"):
    model.apply({"params": params}, jnp.zeros((1, 41), jnp.int32))


def test_zero_loops_at_call_raises():
  model, params = _model_and_params()
  with pytest.raises(ValueError, match="loops"):
    model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32), 0)
