r"""python -m flt_jax.sample: generate text from a workdir's latest checkpoint.

  python -m flt_jax.sample --workdir=DIR --prompt="def fib(" --loops=12 \
      --max_new_tokens=200 [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0] \
      [--stop_token=ID | -1] [--step=N] [--exit=kl:5e-4 --min_loops=2] [--kv_loops=4]

The model's config comes from the checkpoint (only the params are restored), the prompt
is tokenized with the run's tokenizer after the document separator (eos), as training
saw documents start, and the text is printed as it is generated (cached decoding,
flt_jax/eval/generate.py). Generation stops after --max_new_tokens or at the stop token
(default: the tokenizer's eos, the end of a document; -1: never).

--exit=criterion:threshold (model/exit.py) ends each token's loops when it exits (at least
--min_loops, at most --loops); --kv_loops=N|first keeps N loop slots per layer in the
cache (model/decode.LoopSlots). After the text, stderr gets what the generation ran:
the mean exit loop of the new tokens, the block evaluations actually run, the cache's
bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
from absl import app, flags, logging

from flt_jax import cli, run
from flt_jax.errors import ConfigError
from flt_jax.eval.generate import Generation, Generator
from flt_jax.model import decode
from flt_jax.model import exit as exit_lib
from flt_jax.train.checkpoint import CheckpointError


class _TextStream:
  """Writes the decoded text of the new tokens as they come: the decode of everything
  so far, minus what was written, holding back a trailing partial UTF-8 character."""

  def __init__(self, tokenizer, write: Callable[[str], None], stop_token: int | None):
    self.tokenizer, self.write, self.stop_token = tokenizer, write, stop_token
    self.tokens: list[int] = []
    self.written = ""
    self.stopped = False

  def __call__(self, step: int, tokens_B: np.ndarray) -> None:
    del step
    token = int(tokens_B[0])
    if self.stopped or token == self.stop_token:
      self.stopped = True
      return
    self.tokens.append(token)
    self._flush(final=False)

  def _flush(self, final: bool) -> None:
    text = self.tokenizer.decode(self.tokens)
    if not final:
      text = text.rstrip("\ufffd")
    if text.startswith(self.written) and len(text) > len(self.written):
      self.write(text[len(self.written) :])
      self.written = text

  def close(self) -> str:
    self._flush(final=True)
    return self.written


def generate_text(
  workdir: str,
  prompt: str,
  *,
  loops: int | None = None,
  max_new_tokens: int = 200,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stop_token: int | None = None,
  step: int | None = None,
  write: Callable[[str], None] | None = None,
  exit_rule: str = "",
  min_loops: int = 1,
  kv_loops: str = "",
  log: Callable[[str], None] | None = None,
) -> str:
  """The generated continuation of `prompt` (its text; the stop token not included),
  written piece by piece to `write` as it is generated; `log` gets the lines saying
  what it ran (describe_generation). Raises ValueError (or CheckpointError) with a
  one-line message naming the problem and the fix. `loops` None runs at the trained K."""
  if loops is not None and loops < 1:  # before any work: 0 is not "the default"
    raise ValueError(
      f"--loops={loops} is invalid: a looped model needs at least one loop; omit --loops "
      "to run at the trained K, or give K' >= 1"
    )
  rule = None
  if exit_rule:  # checked before the restore; max_loops is --loops, or the trained K
    rule = exit_lib.parse_exit(exit_rule, flag="--exit", min_loops=min_loops, max_loops=loops or 0)
  elif min_loops != 1:
    raise ValueError(f"--min_loops={min_loops} needs --exit=criterion:threshold, e.g. kl:5e-4")
  restored = run.restore_checkpoint(workdir, None, step)
  run_setup, params = restored.run_setup, restored.params
  tokenizer = run_setup.tokenizer
  if loops is None:
    loops = restored.trained_loops
  slots = decode.parse_kv_loops(kv_loops, loops)
  if stop_token is None:
    stop_token = int(tokenizer.eos_id)
  elif stop_token < 0:
    stop_token = None
  generator = Generator(
    run_setup.model_cfg,
    loops=loops,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_token=stop_token,
    exit_rule=rule,
    kv_loops=slots,
  )
  prompt_tokens = [int(tokenizer.eos_id), *tokenizer.encode(prompt)]
  stream = _TextStream(tokenizer, write or (lambda s: None), stop_token)
  out = generator.generate(params, prompt_tokens, max_new_tokens, seed=seed, on_token=stream)
  text = stream.close()
  if log is not None:
    for line in describe_generation(generator, out, len(prompt_tokens), max_new_tokens):
      log(line)
  return text


def describe_generation(
  generator: Generator, out: Generation, prompt_len: int, max_new_tokens: int
) -> list[str]:
  """What a generation ran, as the figures say: each new token's loops (its exit loop),
  the block evaluations the steps and the prompt pass actually ran, the cache's bytes."""
  rule, loops = generator.exit_rule, generator.loops
  tokens = sum(len(row) for row in out.exit_loops)
  how = f"exit {rule.label}, min_loops {rule.min_loops}" if rule else "no exit"
  lines = [
    f"loops: K={loops}, {how}: mean exit loop {out.mean_exit_loop():.2f} over {tokens} new "
    f"token(s); block evaluations run: {out.step_block_evaluations:,} by {out.steps} step(s) "
    f"({out.step_loops} loop iterations x {out.n_layer} layers), "
    f"{out.prefill_block_evaluations:,} by the prompt pass"
  ]
  rows = len(out.rows)
  length = generator.cache_length(prompt_len, max_new_tokens)
  used = generator.cache_bytes(rows, length)
  exact = Generator(generator.model_cfg, loops=loops).cache_bytes(rows, length)
  lines.append(
    f"cache: {generator.kv_loops.describe(loops)}: {used:,} bytes, {used / exact:.3f}x the "
    f"exact cache's {exact:,} ({rows} row(s) x {length} positions)"
  )
  return lines


def define_flags() -> None:
  """Defines the command's flags. Called only when the module runs as a program: absl
  flags are global, so the commands' functions can be imported side by side."""
  flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to sample from.")
  flags.DEFINE_string("prompt", "", "Text to continue (may be empty).")
  flags.DEFINE_integer("loops", None, "Loop count K' >= 1 (default: the trained K).")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = off.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer(
    "stop_token", None, "Stop after this token id (default: the tokenizer's eos; -1: never)."
  )
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string(
    "exit",
    "",
    "Per-token exit: criterion:threshold, one of latent_diff:x, kl:x, argmax_stable:n "
    "(0 never exits); a token's loops end when it exits.",
  )
  flags.DEFINE_integer("min_loops", 1, "With --exit: loops every token runs before it may exit.")
  flags.DEFINE_string(
    "kv_loops",
    "",
    "Loop slots per layer in the key/value cache: N (a ring: loop i writes slot i mod N; "
    "N = --loops is the exact cache) or 'first' (loop 0's keys/values for every loop); "
    "default: the exact cache.",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    raise SystemExit("error: --workdir is required (the run directory to sample from)")
  shown, report = [], []

  def write(text: str) -> None:  # the prompt first, once generation has started
    if not shown:
      shown.append(True)
      print(flags.FLAGS.prompt, end="", flush=True)
    print(text, end="", flush=True)

  try:
    generate_text(
      flags.FLAGS.workdir,
      flags.FLAGS.prompt,
      loops=flags.FLAGS.loops,
      max_new_tokens=flags.FLAGS.max_new_tokens,
      temperature=flags.FLAGS.temperature,
      top_k=flags.FLAGS.top_k,
      top_p=flags.FLAGS.top_p,
      seed=flags.FLAGS.seed,
      stop_token=flags.FLAGS.stop_token,
      step=flags.FLAGS.step,
      write=write,
      exit_rule=flags.FLAGS.exit,
      min_loops=flags.FLAGS.min_loops,
      kv_loops=flags.FLAGS.kv_loops,
      log=report.append,
    )
  except (ConfigError, ValueError, CheckpointError) as e:
    raise SystemExit(f"error: {e}") from None
  write("")
  print(flush=True)
  for line in report:  # after the text's last line
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
