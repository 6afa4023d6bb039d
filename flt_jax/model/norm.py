"""Weightless RMSNorm (the reference's F.rms_norm), with a backward pass that keeps only
its output and scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS = float(np.finfo(np.float32).eps)  # the reference's F.rms_norm default for float32


@jax.custom_vjp
def _rms_norm32(x32):
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _EPS)


def _rms_norm32_fwd(x32):
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _EPS)
  y = x32 * r
  # Only the output (which the next matmul keeps anyway) and the [..., 1] scale are
  # kept for the backward pass, not the input: less to store per layer and loop.
  return y, (y, r)


def _rms_norm32_bwd(res, g):
  y, r = res
  return (r * (g - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_rms_norm32.defvjp(_rms_norm32_fwd, _rms_norm32_bwd)


def rms_norm(x):
  """RMSNorm without learnable scale, computed in float32, returned in x's dtype."""
  return _rms_norm32(x.astype(jnp.float32)).astype(x.dtype)
