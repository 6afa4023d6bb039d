"""Sampling filters against a plain numpy reference, and the samples' empirical frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.eval import sampling

LOGITS = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.5, 0.2, 0.2, 0.05, 0.05]], np.float32))


def _kept(filtered):
  return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(filtered)]


def test_top_k_keeps_the_k_largest():
  assert _kept(sampling.filter_top_k(jnp.asarray(LOGITS), 2)) == [{1, 3}, {0, 1, 2}]  # a tie kept
  np.testing.assert_array_equal(sampling.filter_top_k(jnp.asarray(LOGITS), 0), LOGITS)


@pytest.mark.parametrize("p", [0.1, 0.45, 0.7, 0.86, 0.999])
def test_top_p_matches_a_plain_reference(p):
  want = []
  for row in np.exp(LOGITS):
    order = np.argsort(-row, kind="stable")
    mass, kept = 0.0, set()
    for i in order:
      if mass >= p:
        break
      kept.add(int(i))
      mass += row[i]
    # tokens tied with the last kept one stay as well
    kept |= set(np.flatnonzero(row >= min(row[list(kept)])).tolist())
    want.append(kept)
  assert _kept(sampling.filter_top_p(jnp.asarray(LOGITS), p)) == want


def test_greedy_and_sample_frequencies():
  logits = jnp.asarray(LOGITS)
  np.testing.assert_array_equal(sampling.sample_next(None, logits, temperature=0.0), [1, 0])
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = jax.vmap(lambda k: sampling.sample_next(k, logits, top_k=2))(keys)
  freq_row0 = np.bincount(np.asarray(draws[:, 0]), minlength=5) / len(keys)
  # top-2 of row 0 renormalised: 0.4/0.7 and 0.3/0.7
  np.testing.assert_allclose(freq_row0, [0, 4 / 7, 0, 3 / 7, 0], atol=0.03)


@pytest.mark.parametrize(
  "args,name",
  [((-1.0, 0, 1.0), "temperature"), ((1.0, -2, 1.0), "top_k"), ((1.0, 0, 0.0), "top_p")],
)
def test_bad_arguments_name_the_flag(args, name):
  with pytest.raises(ValueError, match=name):
    sampling.check_sampling_args(*args)
