"""The looped decoder: an nn.scan over K loops with shared (broadcast) params,
around an nn.scan over the L distinct layers with stacked params. What enters each loop
and each layer per variant (LT, LT_i, LT_ia, FLT_res, FLT) is model/variants.py's.

`hidden_states` runs a static number of loops; `loop_inputs` and `run_loops` expose the
same scan for callers that run the loops in pieces (model/windowed.py: a traced loop
count, with gradient through the last loops only).
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from flt_jax.model import variants
from flt_jax.model.config import ModelConfig, remat_policy
from flt_jax.model.layers import Block, constrain_activation, rope_tables
from flt_jax.model.norm import rms_norm


def _argnum(method, name: str) -> int:
  """Position of argument `name` in a module method, counting self as 0 (nn.remat's rule)."""
  return list(inspect.signature(method).parameters).index(name)


def loop_output(x_BxTxD):
  """h, what a loop passes on (to the next loop, or the head): its output, normed."""
  return constrain_activation(rms_norm(x_BxTxD))


def layer_params(params, layer: int):
  """Layer `layer`'s Block params: its slice of the stack the layer scan keeps."""
  return jax.tree.map(lambda a: a[layer], params["blocks"]["layers"]["block"])


class _LayerStack(nn.Module):
  """Runs the L blocks of one loop as an nn.scan over stacked layer params."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, h_BxTxD, h_query_BxTxD, has_h, cos, sin, segment_ids_BxT):
    cfg = self.cfg
    block = Block
    if cfg.remat == "block":
      block = nn.remat(Block, prevent_cse=False, policy=remat_policy(cfg.remat_policy))

    def body(module, x, layer_xs):
      window_left, layer_index = layer_xs
      inject_query = variants.injects_query(cfg.variant, has_h, layer_index)
      x = module(
        x, h_BxTxD, h_query_BxTxD, inject_query, has_h, cos, sin, window_left, segment_ids_BxT
      )
      return x, None

    scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.n_layer,
      unroll=cfg.n_layer if cfg.unroll_layers else 1,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layer_xs = (jnp.asarray(cfg.window_sizes, jnp.int32), jnp.arange(cfg.n_layer))
    x_BxTxD, _ = scan(block(cfg, name="block"), x_BxTxD, layer_xs)
    return x_BxTxD


class _Loop(nn.Module):
  """One loop: pick the input for this variant, run the layers, emit h and diagnostics."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    h_BxTxD,
    loop_index,
    x0_BxTxD,
    x0_normed,
    cos,
    sin,
    segment_ids_BxT,
    keep_all_loops,
    skip_negative=False,
  ):
    """With `skip_negative` (static), a negative loop_index is an empty slot: h passes
    through unchanged and its residual norm is 0 (a fixed-length scan that runs fewer
    loops)."""
    h_in_BxTxD = h_BxTxD
    has_h = loop_index > 0
    variant = self.cfg.variant
    h_BxTxD = constrain_activation(h_BxTxD)
    x_BxTxD = variants.loop_input(variant, h_BxTxD, x0_BxTxD, x0_normed, has_h)
    h_query = variants.query_source(variant, h_BxTxD)
    x_BxTxD = _LayerStack(self.cfg, name="layers")(
      x_BxTxD, h_BxTxD, h_query, has_h, cos, sin, segment_ids_BxT
    )
    # The paper's residual-explosion signal: mean L2 norm of the stream before norm.
    residual_norm = jnp.mean(jnp.linalg.norm(x_BxTxD.astype(jnp.float32), axis=-1))
    h_BxTxD = loop_output(x_BxTxD)
    if skip_negative:
      live = loop_index >= 0
      h_BxTxD = jnp.where(live, h_BxTxD, h_in_BxTxD)
      residual_norm = jnp.where(live, residual_norm, 0.0)
    return h_BxTxD, (h_BxTxD if keep_all_loops else None, residual_norm)


class LoopedTransformer(nn.Module):
  """Decoder-only looped transformer; `loops` is chosen per call (default cfg.loops).

  Packed rows: with `cfg.separate_documents`, the optional segment_ids_BxT (document id
  of each token) and positions_BxT (position within its document) keep attention inside
  each document and restart the rotary positions; without the flag they are ignored and
  every row is one sequence at positions 0..T-1, as in the official implementation.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.wte = nn.Embed(
      cfg.padded_vocab_size,
      cfg.d_model,
      param_dtype=jnp.float32,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), ("vocab", "embed")
      ),
    )
    self.lm_head = nn.Dense(
      cfg.padded_vocab_size,
      use_bias=False,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.001), ("embed", "vocab")
      ),
    )
    loop = _Loop
    if self.cfg.remat == "loop":  # keep only the K loop carries for the backward pass
      loop = nn.remat(
        _Loop,
        prevent_cse=False,
        # Python bools that decide the outputs' structure or the body's ops: static
        static_argnums=(
          _argnum(_Loop.__call__, "keep_all_loops"),
          _argnum(_Loop.__call__, "skip_negative"),
        ),
        policy=remat_policy(self.cfg.remat_policy),
      )
    scanned = nn.scan(
      loop,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=(0,) + (nn.broadcast,) * 7,
    )
    self.blocks = scanned(self.cfg)

  def _rope(self, T: int, positions_BxT):
    """cos, sin [B or 1, T, head_dim // 2]: rows of the rotary table at each position."""
    cfg = self.cfg
    if positions_BxT is None:
      cos, sin = rope_tables(cfg.head_dim, T, cfg.rope_base, cfg.rope_bf16)
      return jnp.asarray(cos)[None], jnp.asarray(sin)[None]
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_table_len, cfg.rope_base, cfg.rope_bf16)
    return jnp.asarray(cos)[positions_BxT], jnp.asarray(sin)[positions_BxT]

  def hidden_states(
    self,
    tokens_BxT,
    loops: int | None = None,
    all_loops: bool = False,
    *,
    segment_ids_BxT=None,
    positions_BxT=None,
  ):
    """Returns (h, residual_norm_K): h is norm(output) of the last loop [B, T, D], or of
    every loop [K, B, T, D] when all_loops; residual_norm_K is each loop's mean stream norm."""
    cfg = self.cfg
    loops = cfg.loops if loops is None else loops
    if loops < 1:
      raise ValueError(f"loops={loops} is invalid: a looped model needs at least one loop")
    inputs = self.loop_inputs(
      tokens_BxT, segment_ids_BxT=segment_ids_BxT, positions_BxT=positions_BxT
    )
    h_last, (h_all, residual_norm_K) = self.run_loops(
      inputs[1], jnp.arange(loops), inputs, all_loops
    )
    return (h_all if all_loops else h_last), residual_norm_K

  def loop_inputs(self, tokens_BxT, *, segment_ids_BxT=None, positions_BxT=None):
    """What every loop reads besides h: (x0, norm(x0), cos, sin, segment_ids_BxT). The
    first loop's carry is norm(x0)."""
    cfg = self.cfg
    T = tokens_BxT.shape[1]
    if cfg.rope_table_len < T:
      raise ValueError(
        f"sequence length {T} exceeds the rotary table ({cfg.rope_table_len} positions); "
        "raise config.model.rope_max_len or config.model.seq_len"
      )
    if not cfg.separate_documents:
      segment_ids_BxT = positions_BxT = None
    cos, sin = self._rope(T, positions_BxT)
    x0, x0_normed = self.embed(tokens_BxT)
    return x0, x0_normed, cos, sin, segment_ids_BxT

  def run_loops(self, h_BxTxD, loop_indices, inputs, all_loops: bool, skip_negative: bool = False):
    """The loops `loop_indices` ([n] int32, in order) from carry h with `loop_inputs`'
    inputs: (h_last, (h_all [n, B, T, D] or None, residual_norm [n])). With
    `skip_negative`, negative indices are empty slots (see _Loop)."""
    x0, x0_normed, cos, sin, segment_ids_BxT = inputs
    return self.blocks(
      h_BxTxD, loop_indices, x0, x0_normed, cos, sin, segment_ids_BxT, all_loops, skip_negative
    )

  def embed(self, tokens_BxT):
    """(x0, norm(x0)): the float32 token embedding every loop may restart from."""
    x0_BxTxD = self.wte(tokens_BxT).astype(jnp.float32)
    return x0_BxTxD, constrain_activation(rms_norm(x0_BxTxD))

  def logits(self, h_BxTxD):
    """Softcapped float32 logits over the true vocabulary."""
    z = self.lm_head(h_BxTxD).astype(jnp.float32)[..., : self.cfg.vocab_size]
    return self.cfg.softcap * jnp.tanh(z / self.cfg.softcap)

  def __call__(
    self, tokens_BxT, loops: int | None = None, *, segment_ids_BxT=None, positions_BxT=None
  ):
    h_BxTxD, _ = self.hidden_states(
      tokens_BxT, loops, segment_ids_BxT=segment_ids_BxT, positions_BxT=positions_BxT
    )
    return self.logits(h_BxTxD)
