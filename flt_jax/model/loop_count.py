"""Training's loop count per step (`config.model.loop_sampling`), drawn in lockstep.

  fixed              always `loops`
  poisson_lognormal  rate ~ LogNormal(log(loops - 1) - sigma^2 / 2, sigma), sigma 0.5
                     (mean loops - 1), count = Poisson(rate) + 1: mean `loops`, as
                     Huginn (arXiv 2502.05171) draws its recurrences
  uniform            1..max_loops, each equally likely

Random counts are clipped to [1, max_loops]. The count of step s is a function of
(seed, s) alone: one uniform number from `fold_in(PRNGKey(seed), stream, s)` (threefry:
integer arithmetic, the same bits on every backend) is inverted through the float32
cumulative distribution `probabilities` tabulates on the host. So every device and host
draws the same count, a resumed run draws the counts of the uninterrupted one, and the
host can recompute any step's count (`draws_on_host`) without reading the device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flt_jax.model.config import ModelConfig

LOGNORMAL_SIGMA = 0.5
# Folded into the seed's key so the draws do not reuse the key that initialises params.
_STREAM = 0x100C


@functools.lru_cache(maxsize=64)
def _table(sampling: str, loops: int, max_count: int) -> np.ndarray:
  """P(count = 1..max_count) in float64."""
  if sampling == "fixed":
    return np.eye(max_count)[loops - 1]
  if sampling == "uniform":
    return np.full(max_count, 1.0 / max_count)
  if loops == 1:  # a rate of mean 0: every count is 1
    return np.eye(max_count)[0]
  # E over the lognormal rate of Poisson(m; rate), by Gauss-Hermite quadrature in
  # log-rate (a smooth integrand: 100 nodes are exact to float64 rounding here).
  nodes, weights = np.polynomial.hermite.hermgauss(100)
  mu = math.log(loops - 1) - LOGNORMAL_SIGMA**2 / 2
  log_rate = mu + math.sqrt(2.0) * LOGNORMAL_SIGMA * nodes
  m = np.arange(max_count - 1)[:, None]
  lgamma = np.array([math.lgamma(k + 1.0) for k in range(max_count - 1)])[:, None]
  poisson = np.exp(m * log_rate - np.exp(log_rate) - lgamma)
  below = poisson @ (weights / math.sqrt(math.pi))  # P(count = m + 1), m < max_count - 1
  return np.append(below, max(0.0, 1.0 - below.sum()))  # the tail is clipped to max_count


def probabilities(cfg: ModelConfig) -> np.ndarray:
  """[max_count] float64: the probability of each count 1..cfg.max_count."""
  return _table(cfg.loop_sampling, cfg.loops, cfg.max_count)


def mean(cfg: ModelConfig) -> float:
  """The expected count (after the clip to max_loops)."""
  return float(np.arange(1, cfg.max_count + 1) @ probabilities(cfg))


def describe(cfg: ModelConfig) -> str:
  """`K=12`, or the draw and the window: `K~poisson_lognormal(mean 6.00, 1..16) backprop 4`."""
  if cfg.loop_sampling == "fixed":
    text = f"K={cfg.loops}"
  else:
    text = f"K~{cfg.loop_sampling}(mean {mean(cfg):.2f}, 1..{cfg.max_count})"
  if cfg.backprop_loops:
    text += f" backprop {cfg.backprop_loops}"
  return text


def draw(cfg: ModelConfig, seed: int, step):
  """The loop count of `step` (an int32 scalar, traced or not): int32 in 1..max_count."""
  if cfg.loop_sampling == "fixed":
    return jnp.int32(cfg.loops)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _STREAM), step)
  u = jax.random.uniform(key, (), jnp.float32)
  cdf = np.cumsum(probabilities(cfg)).astype(np.float32)[:-1]
  return (1 + jnp.sum(u >= cdf)).astype(jnp.int32)


def draws_on_host(cfg: ModelConfig, seed: int, steps) -> np.ndarray:
  """The counts of `steps` (the training step indices, 0 = the first step), computed
  on the host's CPU: the same numbers the train step draws on its devices."""
  steps = np.asarray(steps, np.int32).reshape(-1)
  try:
    host = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device draws the same bits
    host = jax.devices()[0]
  with jax.default_device(host):
    return np.asarray(_draws(cfg, seed, jnp.asarray(steps)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draws(cfg: ModelConfig, seed: int, steps):
  return jax.vmap(lambda s: draw(cfg, seed, s))(steps)
