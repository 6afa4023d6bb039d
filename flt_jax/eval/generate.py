"""Text generation with the exact per-(loop, layer) key/value cache (model/decode.py).

One jitted call per generation: prefill the (right-padded) prompt in one pass, pick the
first token from its last real position, then a jax.lax.while_loop that feeds each new
token through the K loops at the next position, picks the next one (greedy,
temperature, top-k, top-p: eval/sampling.py) and stops after max_new_tokens or once
every row has produced the stop token. Streaming goes through an ordered
jax.experimental.io_callback inside the loop, so the host sees each token as it comes.

    gen = Generator(model_cfg, loops=12, temperature=0.8, top_p=0.95, stop_token=eos)
    rows = gen(params, prompt_tokens, max_new_tokens=200, seed=0, on_token=print)

Prompts are padded to power-of-two lengths, so prompts of similar length share one
compiled program (per batch size and max_new_tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from flt_jax.eval import sampling
from flt_jax.model.config import ModelConfig
from flt_jax.model.decode import CachedDecoder

# on_token(step, tokens_B): the step-th new token of every row (numpy int32 [B]).
TokenCallback = Callable[[int, np.ndarray], None]


def padded_length(n: int, min_bucket: int = 16) -> int:
  """The prompt length rounded up to a power of two (at least min_bucket)."""
  return max(min_bucket, 1 << max(0, (n - 1).bit_length()))


class Generator:
  """Cached generation from a LoopedTransformer's params at `loops` loops.

  temperature 0 is greedy; top_k 0 and top_p 1 are off. stop_token None never stops
  early; otherwise a row ends with the stop token (included in its output) and the loop
  ends when every row has ended.
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
  ):
    sampling.check_sampling_args(temperature, top_k, top_p)
    if loops < 1:
      raise ValueError(f"--loops={loops} is invalid: a looped model needs at least one loop")
    if stop_token is not None and not 0 <= stop_token < model_cfg.vocab_size:
      raise ValueError(
        f"--stop_token={stop_token} is outside the vocabulary [0, {model_cfg.vocab_size}); "
        "pick a token id of the model's tokenizer, or -1 for no stop token"
      )
    if not model_cfg.platform:  # runs where jit puts it: the default device
      model_cfg = model_cfg.for_devices(jax.local_devices()[:1])
    self.model_cfg = model_cfg
    self.loops = int(loops)
    self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
    self.stop_token = stop_token
    self.decoder = CachedDecoder(model_cfg)
    self._compiled = {}
    self._on_token: TokenCallback | None = None

  def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError unless the prompt and max_new_tokens fit the model's rotary table."""
    if max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens={max_new_tokens} is invalid: generate at least 1 token")
    if prompt_len < 1:
      raise ValueError("the prompt is empty: generation needs at least one prompt token")
    table = self.model_cfg.rope_table_len
    needed = prompt_len + max_new_tokens - 1  # the last new token is never fed back
    if needed > table:
      raise ValueError(
        f"the prompt ({prompt_len} tokens) plus --max_new_tokens={max_new_tokens} needs "
        f"{needed} positions, more than the rotary table's {table} "
        "(config.model.rope_max_len, 0 = 10 * seq_len); shorten the prompt or lower "
        f"--max_new_tokens to at most {table - prompt_len + 1}"
      )

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
      out_BxN, steps = self._compiled[key](params, padded_BxTp, P, jax.random.key(seed))
      out_BxN = np.asarray(out_BxN)[:, : int(steps)]
    finally:
      self._on_token = None
    rows = []
    for row in out_BxN.tolist():
      if self.stop_token is not None and self.stop_token in row:
        row = row[: row.index(self.stop_token) + 1]
      rows.append(row)
    return rows

  def _emit(self, step, tokens_B) -> None:
    if self._on_token is not None:
      self._on_token(int(step), np.asarray(tokens_B))

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
      # Positions 0..Tp-1 hold the padded prompt, then up to N - 1 fed-back tokens.
      cache = decoder.init_cache(loops, B, Tp + N - 1)
      logits_BxV, cache = decoder.prefill(params, prompt_BxTp, prompt_len, cache)
      token_B = choose(rng, 0, logits_BxV)
      out_BxN = jnp.full([B, N], fill, jnp.int32).at[:, 0].set(token_B)
      emit(0, token_B)

      def cond(state):
        step, _, done_B, _, _ = state
        return (step < N) & ~jnp.all(done_B)

      def body(state):
        step, token_B, done_B, out_BxN, cache = state
        logits_BxV, cache = decoder.step(params, token_B, cache)
        token_B = jnp.where(done_B, fill, choose(rng, step, logits_BxV))
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
        emit(step, token_B)
        return step + 1, token_B, done_B | ended(token_B), out_BxN, cache

      state = (jnp.int32(1), token_B, ended(token_B), out_BxN, cache)
      steps, _, _, out_BxN, _ = jax.lax.while_loop(cond, body, state)
      return out_BxN, steps

    return run


def make_cached_generate_fn(model_cfg: ModelConfig, params, loops: int, stop_token=None):
  """generate_fn(prompt_tokens, max_new_tokens) -> new token ids (greedy, cached): the
  lm-eval adapter's GenerateFn signature."""
  generator = Generator(model_cfg, loops=loops, stop_token=stop_token)

  def generate(prompt_tokens: Sequence[int], max_new_tokens: int):
    return generator(params, list(prompt_tokens), max_new_tokens)[0]

  generate.generator = generator
  return generate
