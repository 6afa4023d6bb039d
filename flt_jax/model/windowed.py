"""A loop count chosen at run time, with gradient through the last loops only.

`windowed_loops(model, params, tokens_BxT, count)` runs `count` loops, an int32 scalar
that may be traced (one compiled program serves every count up to `cfg.max_count`), as

  1. a prefix of max(count - W, 0) loops in a `lax.while_loop` over stop_gradient'ed
     params and inputs: no gradient, and nothing kept for the backward pass;
  2. a scan of W = `cfg.gradient_window` loop slots, the model's own loop scan
     (`LoopedTransformer.run_loops`, remat and variants included): slot j runs loop
     count - W + j; when count < W the first W - count slots have negative indices and
     pass h through unchanged.

The backward pass keeps what W loops keep, whatever the count. The gradient is that of
the plain model whose h after loop count - W - 1 is stop_gradient'ed (the embedding
still gets gradient through every loop of the window: the variants re-inject x0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flt_jax.model.looped import LoopedTransformer


class WindowedLoops(NamedTuple):
  h_BxTxD: Any  # h of the last loop, count - 1
  h_WxBxTxD: Any  # every slot's h (empty slots: the carry they passed on); None unless all_loops
  loop_index_W: Any  # int32: the loop each slot ran; negative = an empty slot
  residual_norm_N: Any  # [max_count]: each loop's mean stream norm, 0 for loops not run
  prefix_values_N: Any  # [max_count]: prefix_fn(h) of each prefix loop, 0 elsewhere; or None


def windowed_loops(
  model: LoopedTransformer,
  params,
  tokens_BxT,
  count,
  *,
  all_loops: bool = False,
  prefix_fn=None,
  segment_ids_BxT=None,
  positions_BxT=None,
) -> WindowedLoops:
  """Runs `count` loops (1 <= count <= cfg.max_count; not checked when traced) with
  gradient through the last min(count, cfg.gradient_window). `prefix_fn(params, h) ->
  float32 scalar` is evaluated on each gradient-free loop's h with the stop_gradient'ed
  params (e.g. its loss, for diagnostics)."""
  cfg = model.cfg
  n_max, window = cfg.max_count, cfg.gradient_window
  count = jnp.asarray(count, jnp.int32)
  variables = {"params": params}
  inputs = model.apply(
    variables,
    tokens_BxT,
    segment_ids_BxT=segment_ids_BxT,
    positions_BxT=positions_BxT,
    method=model.loop_inputs,
  )
  frozen_variables, frozen_inputs = jax.lax.stop_gradient((variables, inputs))
  n_prefix = jnp.maximum(count - window, 0)

  def prefix_loop(i, carry):
    h_BxTxD, residual_norm_N, values_N = carry
    h_BxTxD, (_, residual_norm_1) = model.apply(
      frozen_variables, h_BxTxD, i[None], frozen_inputs, False, method=model.run_loops
    )
    residual_norm_N = residual_norm_N.at[i].set(residual_norm_1[0])
    if prefix_fn is not None:
      values_N = values_N.at[i].set(prefix_fn(frozen_variables["params"], h_BxTxD))
    return h_BxTxD, residual_norm_N, values_N

  zeros_N = jnp.zeros((n_max,), jnp.float32)
  h_prefix, residual_norm_N, values_N = jax.lax.fori_loop(
    0, n_prefix, prefix_loop, (frozen_inputs[1], zeros_N, zeros_N)
  )
  # Without a prefix the window starts from norm(x0) itself, whose gradient reaches the
  # embedding (LT's loop 0 reads its carry).
  h_start = jnp.where(n_prefix > 0, h_prefix, inputs[1])
  loop_index_W = count - window + jnp.arange(window, dtype=jnp.int32)
  h_last, (h_all, residual_norm_W) = model.apply(
    variables, h_start, loop_index_W, inputs, all_loops, True, method=model.run_loops
  )
  slot_loop = jnp.where(loop_index_W >= 0, loop_index_W, n_max)  # n_max: dropped
  residual_norm_N = residual_norm_N.at[slot_loop].set(residual_norm_W, mode="drop")
  return WindowedLoops(
    h_last, h_all, loop_index_W, residual_norm_N, values_N if prefix_fn is not None else None
  )
