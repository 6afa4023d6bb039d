"""EleutherAI lm-evaluation-harness (`lm-eval`, an optional dependency: see
requirements-eval.txt) scoring a flt_jax model.

`FltLM` implements the harness's `LM` interface on top of two pluggable functions:
  score_fn(pairs) -> [(sum log-prob of continuation, all continuation tokens greedy)]
      (the same ScoreFn as CORE: Evaluator.score_fn, on the sharded score step)
  generate_fn(prompt_tokens, max_new_tokens) -> iterable of new token ids
      (greedy; the default, make_default_generate_fn, decodes with the exact key/value
      cache (eval/generate.py) when the prompt and the new tokens fit max_length, and
      otherwise recomputes the last max_length tokens per new token, a sliding window
      a cache cannot reproduce)

    lm = FltLM.from_evaluator(evaluator, params, tokenizer, loops=12, max_length=1024)
    results = evaluate(lm, ["my_task"], task_manager(["my_task"], "tasks/"))

(`python -m flt_jax.main --mode=eval --eval_tasks=lm_eval:<task,...>` does this for a
workdir's checkpoint.)

Requests are scored as the harness's own causal-LM models do: the context's trailing
whitespace moves into the continuation, every context starts with the document-start
token (the tokenizer's eos_id, which packed training puts between documents; the HF
models' BOS), an empty context is that token alone, rolling
log-likelihoods cut long documents into disjoint windows of `max_length` tokens, and
generation stops at the first stop string of `until`, at the eos token or after
`max_gen_toks` tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

try:
  from lm_eval import utils as lm_eval_utils
  from lm_eval.api.model import TemplateLM
except ImportError as e:
  raise ImportError(
    "flt_jax.eval.lm_eval_adapter needs EleutherAI's lm-eval (an optional dependency): "
    "pip install -r requirements-eval.txt"
  ) from e

from flt_jax.eval.evaluator import Evaluator
from flt_jax.eval.generate import Generator
from flt_jax.eval.scorer import ScoreFn, bucket_length

GenerateFn = Callable[[Sequence[int], int], Iterable[int]]

DEFAULT_MAX_GEN_TOKS = 256
# gen_kwargs the greedy generator honours; anything else is refused rather than ignored.
_GREEDY_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}


def make_greedy_generate_fn(model, params, loops: int, max_len: int) -> GenerateFn:
  """Greedy decoding by recomputing the last `max_len` tokens for every new token (no
  cache): exact for every variant, quadratic in the length. Windows are right-padded to
  power-of-two lengths, so a generation compiles a handful of shapes."""

  @jax.jit
  def next_token(params, tokens_1xT, last_index):
    logits_1xTxV = model.apply({"params": params}, tokens_1xT, loops)
    return jnp.argmax(logits_1xTxV[0, last_index])

  def generate(prompt_tokens: Sequence[int], max_new_tokens: int):
    tokens = list(prompt_tokens)
    if not tokens:
      raise ValueError("generation needs at least one prompt token")
    for _ in range(max_new_tokens):
      window = tokens[-max_len:]
      padded_1xT = np.zeros([1, bucket_length(len(window), max_len)], np.int32)
      padded_1xT[0, : len(window)] = window
      token = int(next_token(params, padded_1xT, len(window) - 1))
      tokens.append(token)
      yield token

  return generate


def make_default_generate_fn(
  model, params, loops: int, max_len: int, stop_token: int | None = None
) -> GenerateFn:
  """Greedy decoding, cached (one prefill, then one step per token) while the prompt and
  max_new_tokens fit `max_len`; longer requests slide a `max_len` window by
  recomputation (make_greedy_generate_fn). Both give the recomputed argmax; the cached
  one stops early at `stop_token`."""
  cached = Generator(model.cfg, loops=loops, stop_token=stop_token)
  recompute = make_greedy_generate_fn(model, params, loops, max_len)

  def generate(prompt_tokens: Sequence[int], max_new_tokens: int):
    prompt = list(prompt_tokens)
    if prompt and len(prompt) + max_new_tokens - 1 <= min(max_len, model.cfg.rope_table_len):
      return cached(params, prompt, max_new_tokens)[0]
    return recompute(prompt, max_new_tokens)

  generate.cached = cached  # its compiled programs show which requests took the cache
  return generate


class FltLM(TemplateLM):
  """lm-eval's LM for any model given as a ScoreFn (and a GenerateFn for generate_until)."""

  def __init__(
    self,
    score_fn: ScoreFn,
    tokenizer,
    *,
    max_length: int,
    generate_fn: GenerateFn | None = None,
    requests_per_call: int = 64,
  ):
    super().__init__()
    self._score_fn = score_fn
    self.tokenizer = tokenizer
    self._max_length = int(max_length)
    self._generate_fn = generate_fn
    # Requests handed to score_fn at once (it batches for the device itself); bounds the
    # host memory of one call and gives the progress bar its steps.
    self._requests_per_call = int(requests_per_call)

  @classmethod
  def from_evaluator(
    cls,
    evaluator: Evaluator,
    params,
    tokenizer,
    *,
    loops: int,
    max_length: int,
    generate_fn: GenerateFn | None = None,
  ) -> FltLM:
    """The evaluator's model at `loops` loops: scored on its sharded score step (its rows
    per call), contexts left-truncated to fit `max_length` tokens (at most the model's
    rotary table); generation greedy (make_default_generate_fn) unless given."""
    score_fn = evaluator.score_fn(params, loops, max_length)
    if generate_fn is None:
      generate_fn = make_default_generate_fn(
        evaluator.model, params, loops, max_length, stop_token=int(tokenizer.eos_id)
      )
    return cls(score_fn, tokenizer, max_length=max_length, generate_fn=generate_fn)

  # -- what TemplateLM needs

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The text's tokens after the document-start (eos) token, as the harness's HF models
    put BOS first; add_special_tokens=False gives the bare tokens."""
    del kwargs
    tokens = list(self.tokenizer.encode(string))
    return tokens if add_special_tokens is False else [self.eot_token_id, *tokens]

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens))

  def _score(self, pairs, disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
    out = []
    chunks = range(0, len(pairs), self._requests_per_call)
    for start in tqdm(chunks, desc=desc, disable=disable_tqdm or not pairs):
      out.extend(self._score_fn(pairs[start : start + self._requests_per_call]))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """requests: [((context, continuation), context_tokens, continuation_tokens)]."""
    pairs = [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
    results = self._score(pairs, disable_tqdm, "loglikelihood")
    for (request_strings, _, _), (logprob, greedy) in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request_strings, (logprob, greedy))
    return [(float(logprob), bool(greedy)) for logprob, greedy in results]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's total log-likelihood, every token predicted once, in disjoint
    windows of at most max_length tokens, the first conditioned on the eos token."""
    windows, owner = [], []
    for index, (text,) in enumerate(request.args for request in requests):
      for context, continuation in map(
        lm_eval_utils.make_disjoint_window,
        lm_eval_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text, add_special_tokens=False),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        ),
      ):
        windows.append((context, continuation))
        owner.append(index)
    totals = [0.0] * len(requests)
    for index, (logprob, _) in zip(owner, self._score(windows, disable_tqdm, "rolling")):
      totals[index] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    if self._generate_fn is None:
      raise ValueError(
        "this FltLM has no generate_fn, so it cannot serve generate_until tasks; build it "
        "with FltLM.from_evaluator or pass generate_fn="
      )
    out = []
    for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
      context, gen_kwargs = request.args
      text = self._generate_one(context, dict(gen_kwargs or {}))
      self.cache_hook.add_partial("generate_until", request.args, text)
      out.append(text)
    return out

  def _generate_one(self, context: str, gen_kwargs: dict) -> str:
    unknown = sorted(set(gen_kwargs) - _GREEDY_KWARGS)
    if unknown:
      raise ValueError(
        f"generate_until got gen_kwargs {unknown}, which greedy decoding does not support; "
        f"it honours {sorted(_GREEDY_KWARGS)}"
      )
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
      raise ValueError(
        "generate_until asked for sampling (do_sample / temperature > 0); this adapter "
        "decodes greedily: set do_sample: false and temperature: 0 in the task's generation_kwargs"
      )
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    prompt = self.tok_encode(context)  # eos first: documents follow an eos in training
    generated: list[int] = []
    for token in self._generate_fn(prompt, max_new):
      if token == self.eot_token_id:
        break
      generated.append(int(token))
      text = self.tok_decode(generated)
      if any(stop in text for stop in until):
        break
    text = self.tok_decode(generated)
    for stop in until:
      text = text.split(stop, 1)[0] if stop else text
    return text


# ----------------------------------------------------------------------------- tasks


def task_manager(tasks: Sequence[str], include_path: str | None = None):
  """An lm-eval TaskManager that knows every one of `tasks` (names, groups or globs):
  `include_path`'s task YAMLs alone when they hold them all (indexing lm-eval's own
  tasks takes seconds), else lm-eval's tasks as well. ValueError naming unknown tasks."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  def unknown(manager) -> list[str]:
    return [t for t in tasks if not manager.match_tasks([t])]

  if include_path:
    if not os.path.isdir(include_path):
      raise ValueError(
        f"--eval_lm_eval_include={include_path} is not a directory; give the directory "
        "that holds the task YAML files"
      )
    local = TaskManager(include_path=include_path, include_defaults=False)
    if not unknown(local):
      return local
  manager = TaskManager(include_path=include_path or None)
  missing = unknown(manager)
  if missing:
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
    raise ValueError(
      f"lm-eval task(s) {missing} are not among {where}; check the names, or point "
      "--eval_lm_eval_include at a directory of task YAML files"
    )
  return manager


def evaluate(lm: FltLM, tasks: Sequence[str], manager, *, limit: int | None = None) -> dict:
  """lm_eval.simple_evaluate of `tasks`: {'results': {task: {metric: value}},
  'versions', 'n-samples', 'n-shot'}; `limit` caps the examples per task."""
  import lm_eval  # pylint: disable=g-import-not-at-top

  out = lm_eval.simple_evaluate(
    model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
  )
  return {key: out.get(key, {}) for key in ("results", "versions", "n-samples", "n-shot")}
