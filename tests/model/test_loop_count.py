"""Training's loop-count draws: the distributions against sampling from their definition,
draws that are a function of (seed, step) alone, and the host's copy of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model import loop_count
from flt_jax.model.config import ModelConfig
from tests.helpers.models import model_config


def make_cfg(**overrides) -> ModelConfig:
  base = dict(vocab_size=64, loops=6, max_loops=16, loop_sampling="poisson_lognormal")
  return model_config(**{**base, **overrides})


def test_poisson_lognormal_matches_sampling_its_definition():
  """rate ~ LogNormal(log(loops - 1) - s^2/2, s), count = Poisson(rate) + 1, clipped to
  max_loops: the tabulated probabilities against 400k draws made that way with numpy."""
  cfg = make_cfg(loops=6, max_loops=12)
  rng = np.random.default_rng(0)
  sigma = loop_count.LOGNORMAL_SIGMA
  rate = rng.lognormal(np.log(5.0) - sigma**2 / 2, sigma, 400_000)
  counts = np.minimum(rng.poisson(rate) + 1, 12)
  empirical = np.bincount(counts, minlength=13)[1:] / counts.size
  probs = loop_count.probabilities(cfg)
  assert probs.shape == (12,) and np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(probs, empirical, atol=3e-3)  # 4 sigma of the largest bin
  assert probs[-1] > 0.01  # the clipped tail is really there at max_loops=12


def test_poisson_lognormal_mean_is_loops_before_the_clip():
  for loops in (2, 6, 12):
    assert loop_count.mean(make_cfg(loops=loops, max_loops=20 * loops)) == pytest.approx(
      loops, abs=1e-6
    )
  clipped = make_cfg(loops=6, max_loops=8)
  assert 5.0 < loop_count.mean(clipped) < 6.0  # the clip pulls the mean down
  assert loop_count.mean(make_cfg(loops=1, max_loops=4)) == 1.0  # a rate of mean 0


def test_uniform_and_fixed_tables():
  np.testing.assert_allclose(
    loop_count.probabilities(make_cfg(loop_sampling="uniform", loops=3, max_loops=5)),
    np.full(5, 0.2),
  )
  fixed = make_cfg(loop_sampling="fixed", loops=3, max_loops=0)
  np.testing.assert_array_equal(loop_count.probabilities(fixed), [0, 0, 1])
  assert int(loop_count.draw(fixed, 0, 7)) == 3
  assert loop_count.mean(make_cfg(loop_sampling="uniform", max_loops=9)) == pytest.approx(5.0)


@pytest.mark.parametrize("sampling", ["poisson_lognormal", "uniform"])
def test_draws_follow_the_table_and_depend_only_on_seed_and_step(sampling):
  cfg = make_cfg(loop_sampling=sampling, loops=6, max_loops=10)
  steps = np.arange(20_000)
  counts = loop_count.draws_on_host(cfg, 3, steps)
  assert counts.dtype == np.int32 and counts.min() >= 1 and counts.max() <= 10
  freq = np.bincount(counts, minlength=11)[1:] / counts.size
  np.testing.assert_allclose(freq, loop_count.probabilities(cfg), atol=0.012)
  # The same (seed, step) gives the same count in any order and batch; another seed not.
  again = loop_count.draws_on_host(cfg, 3, steps[::-1][:500])
  np.testing.assert_array_equal(again, counts[::-1][:500])
  other_seed = loop_count.draws_on_host(cfg, 4, steps[:500])
  assert np.mean(other_seed != counts[:500]) > 0.5


def test_traced_draw_in_a_jitted_step_equals_the_host_copy():
  """What the train step computes from its traced step counter, one compilation for
  every step, is what the host recomputes for logging."""
  cfg = make_cfg(loop_sampling="uniform", max_loops=12)
  drawn = jax.jit(lambda step: loop_count.draw(cfg, 11, step))
  device = [int(drawn(jnp.int32(s))) for s in range(40)]
  assert drawn._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(device, loop_count.draws_on_host(cfg, 11, range(40)))
  assert len(set(device)) > 5


def test_describe():
  assert loop_count.describe(make_cfg(loop_sampling="fixed", loops=12)) == "K=12"
  text = loop_count.describe(make_cfg(backprop_loops=4, max_loops=16))
  assert text.startswith("K~poisson_lognormal(mean 5.9") and text.endswith("1..16) backprop 4")
