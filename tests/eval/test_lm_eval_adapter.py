"""The lm-eval harness scoring flt_jax through FltLM, on task definitions that point at
local JSONL files (tests/fixtures/lm_eval; no download, datasets offline): multiple choice
with scorers whose answers are known and with the tiny model against a direct
log-likelihood, rolling log-likelihood over windows, and greedy generate_until."""

import json
import math
import os
import pathlib

import numpy as np
import pytest
import yaml

# Before lm_eval pulls in datasets / huggingface_hub: never reach for the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip(
  "lm_eval", reason="lm-eval is an optional dependency: pip install -r requirements-eval.txt"
)
pytestmark = pytest.mark.needs_extra  # .ci/run runs it after installing the extra

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from flt_jax.eval.lm_eval_adapter import FltLM  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
EOS = 256  # BytesTokenizer's document separator
MAX_LENGTH = 16
LOOPS = 2


def _from_evaluator(tiny_lm, make_evaluator, max_length):
  """FltLM on the tiny model's sharded evaluator (8 rows per call), default generation."""
  evaluator = make_evaluator(tiny_lm.model, 8)
  return FltLM.from_evaluator(
    evaluator, tiny_lm.params, tiny_lm.tokenizer, loops=LOOPS, max_length=max_length
  )


def _write_task(tmp_path, name, data_file, **config):
  task = {
    "task": name,
    "dataset_path": "json",
    "dataset_kwargs": {
      "data_files": {"test": str(FIXTURES / data_file)},
      "cache_dir": str(tmp_path / "hf_cache"),
    },
    "test_split": "test",
    **config,
  }
  task_dir = tmp_path / "tasks"
  task_dir.mkdir(exist_ok=True)
  (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task))
  return task_dir


def _evaluate(lm, task_dir, name):
  out = lm_eval.simple_evaluate(
    model=lm,
    tasks=[name],
    task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    log_samples=True,
    bootstrap_iters=0,
  )
  return out["results"][name], out["samples"][name]


def _choice_task(tmp_path):
  return _write_task(
    tmp_path,
    "flt_choice",
    "choice.jsonl",
    output_type="multiple_choice",
    doc_to_text="Question: {{question}}\nAnswer:",
    doc_to_choice="choices",
    doc_to_target="gold",
    metric_list=[{"metric": "acc"}],
  )


def _docs(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_multiple_choice_with_known_answers(tmp_path, tiny_lm):
  task_dir = _choice_task(tmp_path)
  docs = _docs("choice.jsonl")
  golds = tuple(f"{d['question']}\nAnswer: {d['choices'][d['gold']]}" for d in docs)

  def oracle(pairs):  # the gold answer is the only plausible continuation of its question
    return [
      ((-0.1 if tiny_lm.tokenizer.decode([*x, *c]).endswith(golds) else -5.0) * len(c), False)
      for x, c in pairs
    ]

  def tie(pairs):
    return [(-1.0, False) for _ in pairs]

  result, _ = _evaluate(FltLM(oracle, tiny_lm.tokenizer, max_length=64), task_dir, "flt_choice")
  assert result["acc,none"] == 1.0
  result, _ = _evaluate(FltLM(tie, tiny_lm.tokenizer, max_length=64), task_dir, "flt_choice")
  assert result["acc,none"] == pytest.approx(np.mean([d["gold"] == 0 for d in docs]))


def test_multiple_choice_with_the_model_matches_direct_log_likelihood(
  tmp_path, tiny_lm, make_evaluator
):
  task_dir = _choice_task(tmp_path)
  lm = _from_evaluator(tiny_lm, make_evaluator, MAX_LENGTH)
  result, samples = _evaluate(lm, task_dir, "flt_choice")
  correct = []
  for sample in samples:
    want = []
    for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
      # the harness's split: the context's trailing whitespace joins the continuation
      stripped = context.rstrip()
      context_tokens = [EOS, *stripped.encode()]
      continuation_tokens = list((context[len(stripped) :] + continuation).encode())
      logprob, greedy = tiny_lm.loglikelihood(
        context_tokens, continuation_tokens, LOOPS, MAX_LENGTH
      )
      assert response[0][0] == pytest.approx(logprob, abs=1e-4)
      assert response[0][1] == greedy
      want.append(logprob)
    correct.append(int(np.argmax(want)) == sample["doc"]["gold"])
  assert len(samples) == 4
  assert result["acc,none"] == pytest.approx(np.mean(correct))


def test_rolling_log_likelihood_over_windows(tmp_path, tiny_lm, make_evaluator):
  task_dir = _write_task(
    tmp_path,
    "flt_text",
    "text.jsonl",
    output_type="loglikelihood_rolling",
    doc_to_text="",
    doc_to_target="text",
    metric_list=[{"metric": "bits_per_byte"}],
  )
  lm = _from_evaluator(tiny_lm, make_evaluator, MAX_LENGTH)
  result, samples = _evaluate(lm, task_dir, "flt_text")

  def ll(context, continuation):
    return tiny_lm.loglikelihood(context, continuation, LOOPS, MAX_LENGTH)[0]

  # Every token predicted once, windows of at most 16 inputs, the first after the eos.
  def reference(text):
    t = list(text.encode())
    if len(t) == 13:
      return ll([EOS], t)
    if len(t) == 28:
      return ll([EOS], t[:16]) + ll(t[11:16], t[16:])
    assert len(t) == 50
    return (
      ll([EOS], t[:16]) + ll(t[15:16], t[16:32]) + ll(t[31:32], t[32:48]) + ll(t[33:48], t[48:])
    )

  totals, total_bytes = [], 0
  for sample in samples:
    text = sample["doc"]["text"]
    want = reference(text)
    assert sample["resps"][0][0] == pytest.approx(want, abs=2e-4)
    totals.append(want)
    total_bytes += len(text.encode())
  assert len(samples) == 3
  want_bpb = -sum(totals) / (total_bytes * math.log(2))
  assert result["bits_per_byte,none"] == pytest.approx(want_bpb, rel=1e-5)


def _qa_task(tmp_path, **generation_kwargs):
  return _write_task(
    tmp_path,
    "flt_qa",
    "qa.jsonl",
    output_type="generate_until",
    doc_to_text="prompt",
    doc_to_target="answer",
    generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False, **generation_kwargs},
    metric_list=[{"metric": "exact_match"}],
  )


def test_generate_until_stops_at_stop_strings_and_eos(tmp_path, tiny_lm):
  """A scripted generator: answers then a newline (cut by `until`) or the eos token."""
  answers = {d["prompt"]: d["answer"] for d in _docs("qa.jsonl")}
  prompts_seen = []

  def scripted(prompt_tokens, max_new_tokens):
    prompts_seen.append(list(prompt_tokens))
    prompt = bytes(prompt_tokens[1:]).decode()
    answer = list(answers[prompt].encode())
    tail = [EOS, *b"never"] if "Italy" in prompt else list(b"\nQ: more")
    return iter((answer + tail)[:max_new_tokens])

  lm = FltLM(lambda pairs: [], tiny_lm.tokenizer, max_length=64, generate_fn=scripted)
  result, samples = _evaluate(lm, _qa_task(tmp_path), "flt_qa")
  assert [s["resps"][0][0] for s in samples] == [d["answer"] for d in _docs("qa.jsonl")]
  assert result["exact_match,none"] == 1.0
  assert all(p[0] == EOS for p in prompts_seen)  # every prompt starts a document
  assert len(prompts_seen) == 3


def test_greedy_generation_matches_recomputed_argmax(tmp_path, tiny_lm, make_evaluator):
  lm = _from_evaluator(tiny_lm, make_evaluator, MAX_LENGTH)
  _, samples = _evaluate(lm, _qa_task(tmp_path, max_gen_toks=4), "flt_qa")
  for sample in samples:
    tokens = [EOS, *sample["doc"]["prompt"].encode()]
    generated = []
    for _ in range(4):  # plain greedy decoding: argmax over the last 16 tokens, unpadded
      token = int(np.argmax(tiny_lm.logits(tokens[-MAX_LENGTH:], LOOPS)[-1]))
      if token == EOS:
        break
      tokens.append(token)
      generated.append(token)
    want = tiny_lm.tokenizer.decode(generated).split("\n", 1)[0]
    assert sample["resps"][0][0] == want


def test_cached_greedy_generation_when_the_request_fits(tmp_path, tiny_lm, make_evaluator):
  """max_length 64 holds prompt + 4 new tokens: the default generator decodes with the
  key/value cache, and gives the recomputed argmax over the whole prefix."""
  lm = _from_evaluator(tiny_lm, make_evaluator, 64)
  _, samples = _evaluate(lm, _qa_task(tmp_path, max_gen_toks=4), "flt_qa")
  assert lm._generate_fn.cached._compiled  # the cached path ran
  assert any(sample["resps"][0][0] for sample in samples)
  for sample in samples:
    tokens = [EOS, *sample["doc"]["prompt"].encode()]
    generated = []
    for _ in range(4):
      token = int(np.argmax(tiny_lm.logits(tokens, LOOPS)[-1]))
      if token == EOS:
        break
      tokens.append(token)
      generated.append(token)
    assert sample["resps"][0][0] == tiny_lm.tokenizer.decode(generated).split("\n", 1)[0]


def test_generate_until_refuses_sampling(tiny_lm):
  lm = FltLM(lambda pairs: [], tiny_lm.tokenizer, max_length=64, generate_fn=lambda p, n: [])
  request = Instance(
    request_type="generate_until",
    doc={},
    arguments=("Q:", {"until": ["\n"], "do_sample": True, "temperature": 0.7}),
    idx=0,
  )
  with pytest.raises(ValueError, match="decodes greedily"):
    lm.generate_until([request])
  request.arguments = ("Q:", {"until": ["\n"], "num_beams": 4})
  with pytest.raises(ValueError, match=r"\['num_beams'\]"):
    lm.generate_until([request])
  no_generator = FltLM(lambda pairs: [], tiny_lm.tokenizer, max_length=64)
  with pytest.raises(ValueError, match="no generate_fn"):
    no_generator.generate_until([request])
