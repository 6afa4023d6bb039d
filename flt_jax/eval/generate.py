"""Text generation with the exact per-(loop, layer) key/value cache (model/decode.py).

One jitted call per generation: prefill the (right-padded) prompt in one pass, pick the
first token from its last real position, then a jax.lax.while_loop that feeds each new
token through the K loops at the next position, picks the next one (greedy,
temperature, top-k, top-p: eval/sampling.py) and stops after max_new_tokens or once
every row has produced the stop token. Streaming goes through an ordered
jax.experimental.io_callback inside the loop, so the host sees each token as it comes.

    gen = Generator(model_cfg, loops=12, temperature=0.8, top_p=0.95, stop_token=eos)
    rows = gen(params, prompt_tokens, max_new_tokens=200, seed=0, on_token=print)
    out = gen.generate(params, prompt_tokens, 200)   # rows and the compute they took

With an exit rule (model/exit.py) every token's loops end when it exits: the prompt but
its last token is prefilled with per-token exit, and each new token comes from a step
(the first from the prompt's last token), whose loop iterations end once every
unfinished row has exited; `Generation` counts the loop iterations (hence block
evaluations) actually run and each token's exit loop. `kv_loops` (decode.LoopSlots)
bounds the cache's loop slots. `teacher_forced` decodes given sequences token by token
through the same cache, for their logits (perplexity under a cache budget).

Prompts are padded to power-of-two lengths, so prompts of similar length share one
compiled program (per batch size and max_new_tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from flt_jax.eval import sampling
from flt_jax.model import decode
from flt_jax.model import exit as exit_lib
from flt_jax.model.config import ModelConfig
from flt_jax.model.decode import CachedDecoder

# on_token(step, tokens_B): the step-th new token of every row (numpy int32 [B]).
TokenCallback = Callable[[int, np.ndarray], None]


def padded_length(n: int, min_bucket: int = 16) -> int:
  """The prompt length rounded up to a power of two (at least min_bucket)."""
  return max(min_bucket, 1 << max(0, (n - 1).bit_length()))


class Generation(NamedTuple):
  """New tokens and the compute that produced them.

  exit_loops: per row, the loops each of its new tokens ran (K without an exit rule).
  step_loops: loop iterations the decoding steps ran, summed over steps (a step's loops
  run while any unfinished row is active, so a batch runs its slowest row's);
  prefill_loops: the prompt pass's; steps: the decoding steps run (one per new token with
  an exit rule; without one the first token comes from the prompt pass). Block
  evaluations actually run = loops x n_layer (`step_block_evaluations`,
  `prefill_block_evaluations`), each over the whole batch.
  """

  rows: list[list[int]]
  exit_loops: list[list[int]]
  step_loops: int
  prefill_loops: int
  steps: int
  n_layer: int

  @property
  def step_block_evaluations(self) -> int:
    return self.step_loops * self.n_layer

  @property
  def prefill_block_evaluations(self) -> int:
    return self.prefill_loops * self.n_layer

  def mean_exit_loop(self) -> float:
    """Mean over every row's new tokens of the loops each ran."""
    loops = [k for row in self.exit_loops for k in row]
    return float(np.mean(loops)) if loops else float("nan")


class TeacherForced(NamedTuple):
  """Sequences decoded token by token through the cache: logits [B, T, V] (float32),
  each token's exit loop [B, T] and each step's loop iterations [T]."""

  logits_BxTxV: np.ndarray
  exit_loops_BxT: np.ndarray
  step_loops_T: np.ndarray


class Generator:
  """Cached generation from a LoopedTransformer's params at `loops` loops.

  temperature 0 is greedy; top_k 0 and top_p 1 are off. stop_token None never stops
  early; otherwise a row ends with the stop token (included in its output) and the loop
  ends when every row has ended. exit_rule: per-token exit (its max_loops capped at
  `loops`); kv_loops: the cache's loop slots (default: one per loop, exact).
  """

  def __init__(
    self,
    model_cfg: ModelConfig,
    *,
    loops: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token: int | None = None,
    exit_rule: exit_lib.ExitRule | None = None,
    kv_loops: decode.LoopSlots | None = None,
  ):
    sampling.check_sampling_args(temperature, top_k, top_p)
    if loops < 1:
      raise ValueError(f"--loops={loops} is invalid: a looped model needs at least one loop")
    if stop_token is not None and not 0 <= stop_token < model_cfg.vocab_size:
      raise ValueError(
        f"--stop_token={stop_token} is outside the vocabulary [0, {model_cfg.vocab_size}); "
        "pick a token id of the model's tokenizer, or -1 for no stop token"
      )
    kv_loops = kv_loops or decode.LoopSlots()
    if kv_loops.ring > loops:
      raise ValueError(
        f"--kv_loops={kv_loops.ring} is more than --loops={loops}: at most one slot per loop"
      )
    if not model_cfg.platform:  # runs where jit puts it: the default device
      model_cfg = model_cfg.for_devices(jax.local_devices()[:1])
    self.model_cfg = model_cfg
    self.loops = int(loops)
    self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
    self.stop_token = stop_token
    if exit_rule is not None:
      exit_rule = exit_lib.with_max_loops(exit_rule, min(exit_rule.max_loops or loops, loops))
    self.exit_rule = exit_rule
    self.kv_loops = kv_loops
    self.decoder = CachedDecoder(model_cfg, kv_loops)
    self._compiled = {}
    self._on_token: TokenCallback | None = None

  def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError unless the prompt and max_new_tokens fit the model's rotary table."""
    if max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens={max_new_tokens} is invalid: generate at least 1 token")
    if prompt_len < 1:
      raise ValueError("the prompt is empty: generation needs at least one prompt token")
    table = self.model_cfg.rope_table_len
    if prompt_len > table:  # no room left for even one new token
      raise ValueError(
        f"the prompt is {prompt_len} tokens, {prompt_len - table} more than the "
        f"{table} positions of the model's rotary table (config.model.rope_max_len, 0 = 10 "
        f"* seq_len); shorten it by at least {prompt_len + max_new_tokens - 1 - table} "
        f"tokens to generate --max_new_tokens={max_new_tokens}"
      )
    needed = prompt_len + max_new_tokens - 1  # the last new token is never fed back
    if needed > table:
      raise ValueError(
        f"the prompt ({prompt_len} tokens) plus --max_new_tokens={max_new_tokens} needs "
        f"{needed} positions, more than the rotary table's {table} "
        "(config.model.rope_max_len, 0 = 10 * seq_len); shorten the prompt or lower "
        f"--max_new_tokens to at most {table - prompt_len + 1}"
      )

  def cache_bytes(self, batch: int, max_len: int) -> int:
    """Bytes of the cache for `batch` rows and `max_len` positions (shapes only)."""
    shapes = jax.eval_shape(lambda: self.decoder.init_cache(self.loops, batch, max_len))
    return decode.cache_bytes(shapes)

  def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
    """The positions a generation's cache holds: the padded prompt, then the new tokens."""
    return padded_length(prompt_len) + max_new_tokens - 1

  def __call__(
    self,
    params,
    prompt_tokens,
    max_new_tokens: int,
    *,
    seed: int = 0,
    on_token: TokenCallback | None = None,
  ) -> list[list[int]]:
    """New tokens of each prompt row (a row ends at its stop token, included).

    prompt_tokens: one prompt (a sequence of ids) or [B, T] ids, every row T long.
    """
    return self.generate(params, prompt_tokens, max_new_tokens, seed=seed, on_token=on_token).rows

  def generate(
    self,
    params,
    prompt_tokens,
    max_new_tokens: int,
    *,
    seed: int = 0,
    on_token: TokenCallback | None = None,
  ) -> Generation:
    """__call__'s rows with the compute that produced them (Generation)."""
    prompt_BxT = np.asarray(prompt_tokens, np.int32)
    if prompt_BxT.ndim == 1:
      prompt_BxT = prompt_BxT[None]
    B, P = prompt_BxT.shape
    self.check_length(P, max_new_tokens)
    Tp = padded_length(P)
    padded_BxTp = np.zeros([B, Tp], np.int32)
    padded_BxTp[:, :P] = prompt_BxT
    key = (B, Tp, int(max_new_tokens), on_token is not None)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self._program(*key[2:]))
    self._on_token = on_token
    try:
      out = jax.device_get(self._compiled[key](params, padded_BxTp, P, jax.random.key(seed)))
    finally:
      self._on_token = None
    out_BxN, exit_loops_BxN, steps, step_loops, prefill_loops = out
    rows, exits = [], []
    for row, loops in zip(out_BxN[:, : int(steps)].tolist(), exit_loops_BxN.tolist()):
      if self.stop_token is not None and self.stop_token in row:
        row = row[: row.index(self.stop_token) + 1]
      rows.append(row)
      exits.append(loops[: len(row)])
    # Without an exit rule the first new token comes from the prompt pass, not a step.
    decode_steps = int(steps) - (self.exit_rule is None)
    return Generation(
      rows, exits, int(step_loops), int(prefill_loops), decode_steps, self.model_cfg.n_layer
    )

  def teacher_forced(self, params, tokens_BxT, real_BxT=None) -> TeacherForced:
    """Decodes tokens_BxT one position at a time through the cache (no prefill: every
    token takes a step, with the exit rule when there is one); real_BxT (default all)
    marks the rows whose tokens keep a step's loops going."""
    tokens_BxT = np.asarray(tokens_BxT, np.int32)
    real_BxT = np.ones(tokens_BxT.shape, bool) if real_BxT is None else np.asarray(real_BxT, bool)
    B, T = tokens_BxT.shape
    self.check_length(T, 1)
    key = ("teacher_forced", B, T)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self._teacher_forced_program())
    logits, exits, loops = jax.device_get(self._compiled[key](params, tokens_BxT, real_BxT))
    return TeacherForced(np.asarray(logits), np.asarray(exits), np.asarray(loops))

  def _emit(self, step, tokens_B) -> None:
    if self._on_token is not None:
      self._on_token(int(step), np.asarray(tokens_B))

  def _decode_step(self, params, token_B, cache, real_B):
    """One token per row through the loops: (logits, cache, exit loops [B], loops run)."""
    decoder, loops = self.decoder, self.loops
    if self.exit_rule is None:
      logits_BxV, cache = decoder.step(params, token_B, cache, loops=loops)
      return logits_BxV, cache, jnp.full(token_B.shape, loops, jnp.int32), jnp.int32(loops)
    logits_BxV, cache, exits = decoder.step_exit(
      params, token_B, cache, self.exit_rule, loops=loops, real_B=real_B
    )
    return logits_BxV, cache, exits.exit_loops_BxT[:, 0], exits.loops_run

  def _teacher_forced_program(self):
    decoder, loops = self.decoder, self.loops

    def run(params, tokens_BxT, real_BxT):
      B, T = tokens_BxT.shape
      cache = decoder.init_cache(loops, B, T)

      def body(cache, inputs):
        token_B, real_B = inputs
        logits_BxV, cache, exit_B, loops_run = self._decode_step(params, token_B, cache, real_B)
        return cache, (logits_BxV, exit_B, loops_run)

      _, (logits_TxBxV, exits_TxB, loops_T) = jax.lax.scan(body, cache, (tokens_BxT.T, real_BxT.T))
      return jnp.swapaxes(logits_TxBxV, 0, 1), exits_TxB.T, loops_T

    return run

  def _program(self, max_new_tokens: int, stream: bool):
    decoder, loops, N = self.decoder, self.loops, max_new_tokens
    stop = self.stop_token
    fill = 0 if stop is None else stop

    def choose(rng, step, logits_BxV):
      return sampling.sample_next(
        jax.random.fold_in(rng, step),
        logits_BxV,
        temperature=self.temperature,
        top_k=self.top_k,
        top_p=self.top_p,
      )

    def emit(step, tokens_B):
      if stream:
        io_callback(self._emit, None, step, tokens_B, ordered=True)

    def ended(tokens_B):
      return jnp.zeros_like(tokens_B, bool) if stop is None else tokens_B == stop

    def run(params, prompt_BxTp, prompt_len, rng):
      B, Tp = prompt_BxTp.shape
      cache = decoder.init_cache(loops, B, self.cache_length(Tp, N))
      out_BxN = jnp.full([B, N], fill, jnp.int32)
      exits_BxN = jnp.full([B, N], loops, jnp.int32)
      if self.exit_rule is None:  # the whole prompt in one pass gives the first token
        logits_BxV, cache = decoder.prefill(params, prompt_BxTp, prompt_len, cache, loops=loops)
        token_B = choose(rng, 0, logits_BxV)
        out_BxN = out_BxN.at[:, 0].set(token_B)
        emit(0, token_B)
        first_step, done_B, prefill_loops = 1, ended(token_B), jnp.int32(loops)
      else:
        # The prompt but its last token side by side; that token is the first step's, so
        # the first new token's loops are counted as a step's.
        _, cache, prefill = decoder.prefill_exit(
          params, prompt_BxTp, prompt_len - 1, cache, self.exit_rule, loops=loops
        )
        token_B = jnp.take(prompt_BxTp, prompt_len - 1, axis=1)
        first_step, done_B, prefill_loops = 0, jnp.zeros([B], bool), prefill.loops_run

      def cond(state):
        step, _, done_B, *_ = state
        return (step < N) & ~jnp.all(done_B)

      def body(state):
        step, token_B, done_B, out_BxN, exits_BxN, step_loops, cache = state
        logits_BxV, cache, exit_B, loops_run = self._decode_step(params, token_B, cache, ~done_B)
        token_B = jnp.where(done_B, fill, choose(rng, step, logits_BxV))
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
        exits_BxN = jax.lax.dynamic_update_slice(exits_BxN, exit_B[:, None], (0, step))
        emit(step, token_B)
        done_B = done_B | ended(token_B)
        return step + 1, token_B, done_B, out_BxN, exits_BxN, step_loops + loops_run, cache

      state = (jnp.int32(first_step), token_B, done_B, out_BxN, exits_BxN, jnp.int32(0), cache)
      steps, _, _, out_BxN, exits_BxN, step_loops, _ = jax.lax.while_loop(cond, body, state)
      return out_BxN, exits_BxN, steps, step_loops, prefill_loops

    return run
