"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Pure jax functions on [B, V] float32 logits, usable inside jax.lax loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_top_k(logits_BxV, k: int):
  """Keeps the k largest logits of each row (ties at the k-th value are kept); -inf elsewhere."""
  if k <= 0 or k >= logits_BxV.shape[-1]:
    return logits_BxV
  kth_B1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
  return jnp.where(logits_BxV >= kth_B1, logits_BxV, -jnp.inf)


def filter_top_p(logits_BxV, p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches p; -inf elsewhere."""
  if p >= 1.0:
    return logits_BxV
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # A token stays if the mass of the tokens ranked above it is still below p.
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_BxV = mass_before_BxV < p
  threshold_B1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= threshold_B1, logits_BxV, -jnp.inf)


def sample_next(rng, logits_BxV, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """[B] int32 next tokens. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  logits_BxV = filter_top_p(filter_top_k(logits_BxV, top_k), top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError naming the bad sampling argument and its allowed range."""
  if not temperature >= 0.0:
    raise ValueError(f"--temperature={temperature} is invalid: use 0 (greedy) or a positive value")
  if top_k < 0:
    raise ValueError(f"--top_k={top_k} is invalid: use 0 (off) or a positive count")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"--top_p={top_p} is invalid: use a value in (0, 1]; 1 is off")
