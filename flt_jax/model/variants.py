"""The five looped variants as rules (arXiv:2605.18797): what enters a loop, what the
attention query is, and where the previous loop's output h is injected.

  LT      loop input h                      (loop 0: norm(x0))
  LT_i    loop input norm(x0 + h)           (loop 0: norm(x0))
  LT_ia   loop input norm(x0); layer 0's attention query is norm(h)
  FLT_res loop input norm(x0); every layer first does x = norm(x + h)
  FLT     loop input norm(x0); every layer's attention query is norm(h)

The training scan (looped.py, layers.Block) and cached decoding (decode.py) both call
these, so a variant is defined here once. `has_h` (loop index > 0) and the injection
flags are traced booleans: one compiled body serves loop 0 (no h yet) and every later
loop.
"""

from __future__ import annotations

import jax.numpy as jnp

from flt_jax.model.norm import rms_norm

QUERY_INJECTION = ("FLT", "LT_ia")  # h reaches the attention query


def loop_input(variant: str, h_BxTxD, x0_BxTxD, x0_normed, has_h):
  """The stream a loop starts from. For LT the carry h starts as norm(x0), so loop 0 is
  covered too."""
  if variant == "LT":
    return h_BxTxD
  if variant == "LT_i":
    return jnp.where(has_h, rms_norm(x0_BxTxD + h_BxTxD), x0_normed)
  return x0_normed


def query_source(variant: str, h_BxTxD):
  """What a query-injecting layer uses as its attention query: norm(h)."""
  return rms_norm(h_BxTxD) if variant in QUERY_INJECTION else h_BxTxD


def injects_query(variant: str, has_h, layer_index):
  """Whether layer `layer_index` takes its query from h (LT_ia: layer 0 only)."""
  return has_h & ((layer_index == 0) | (variant != "LT_ia"))


def block_input(variant: str, x_BxTxD, h_BxTxD, inject_residual):
  """The stream entering a block: FLT_res first adds h and norms."""
  if variant == "FLT_res":
    return jnp.where(inject_residual, rms_norm(x_BxTxD + h_BxTxD), x_BxTxD)
  return x_BxTxD


def attention_query(variant: str, x_normed, h_query_BxTxD, inject_query):
  """The attention's query input: the normed stream, or h's where the variant injects."""
  if variant in QUERY_INJECTION:
    return jnp.where(inject_query, h_query_BxTxD, x_normed)
  return x_normed
