"""CORE in-context evaluation on a miniature eval bundle (tests/fixtures/eval_bundle):
the bundle reader and its errors, few-shot prompts, the multiple-choice / schema /
language-modelling decision rules with scorers whose answers are known, and the centred
accuracy. The model's scorer is tested in test_evaluator.py, the command in
test_eval_tasks.py."""

import pathlib
import shutil

import numpy as np
import pytest

from flt_jax.data.tokenizers import BytesTokenizer
from flt_jax.eval import core

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "eval_bundle"
TOKENIZER = BytesTokenizer()


def _decode(ids):
  return bytes(i for i in ids if i < 256).decode("utf-8")


def _gold_endings(tasks):
  """The text each example's correct prompt ends with."""
  endings = set()
  for task in tasks:
    d = task.continuation_delimiter
    for row in task.rows:
      if task.task_type == "multiple_choice":
        endings.add(f"{row['query']}{d}{row['choices'][row['gold']]}")
      elif task.task_type == "schema":
        endings.add(f"{row['context_options'][row['gold']]}{d}{row['continuation']}")
      else:
        endings.add(f"{row['context'].strip()}{d}{row['continuation']}")
  return endings


def oracle_score_fn(tasks):
  """Only the gold prompt is plausible: low loss and greedy for it, high loss otherwise."""
  endings = _gold_endings(tasks)

  def score(pairs):
    out = []
    for context, continuation in pairs:
      gold = _decode(list(context) + list(continuation)).endswith(tuple(endings))
      out.append(((-0.1 if gold else -3.0) * len(continuation), gold))
    return out

  return score


def tie_score_fn(pairs):
  """Every option has the same mean loss per token; nothing is greedy."""
  return [(-1.5 * len(continuation), False) for _, continuation in pairs]


def test_bundle_reads_tasks_baselines_and_rows():
  tasks = {t.label: t for t in core.load_bundle(BUNDLE)}
  assert list(tasks) == ["toy_choice", "toy_schema", "toy_lm"]
  assert [tasks[k].task_type for k in tasks] == ["multiple_choice", "schema", "language_modeling"]
  assert [tasks[k].num_fewshot for k in tasks] == [2, 1, 1]
  # eval_meta_data.csv gives percent; the tasks hold fractions
  assert [tasks[k].random_baseline for k in tasks] == [0.25, 0.5, 0.0]
  assert tasks["toy_choice"].continuation_delimiter == " Answer: "
  assert tasks["toy_schema"].continuation_delimiter == " "  # the default
  assert [len(tasks[k].rows) for k in tasks] == [6, 5, 4]
  only = core.load_bundle(BUNDLE, tasks=["toy_lm"])
  assert [t.label for t in only] == ["toy_lm"]


def test_gold_only_plausible_scores_every_example_right():
  tasks = core.load_bundle(BUNDLE)
  result = core.evaluate_core(BUNDLE, oracle_score_fn(tasks), TOKENIZER)
  for r in result.tasks.values():
    assert r.accuracy == 1.0
    assert r.examples == {"toy_choice": 6, "toy_schema": 5, "toy_lm": 4}[r.label]
    assert r.centered == pytest.approx((1.0 - r.random_baseline) / (1.0 - r.random_baseline))
  assert result.core == pytest.approx(1.0)


def test_all_choices_equal_picks_the_first_option():
  """Ties go to option 0, so accuracy is the share of rows whose gold is 0."""
  tasks = {t.label: t for t in core.load_bundle(BUNDLE)}
  result = core.evaluate_core(BUNDLE, tie_score_fn, TOKENIZER)
  expected = {}
  for label, task in tasks.items():
    if task.task_type == "language_modeling":
      accuracy = 0.0  # never greedy
    else:
      accuracy = sum(row["gold"] == 0 for row in task.rows) / len(task.rows)
    b = task.random_baseline
    expected[label] = (accuracy - b) / (1.0 - b)
    assert result.tasks[label].accuracy == pytest.approx(accuracy)
    assert result.tasks[label].centered == pytest.approx(expected[label])
  assert result.tasks["toy_choice"].accuracy == pytest.approx(2 / 6)
  assert result.tasks["toy_schema"].accuracy == pytest.approx(2 / 5)
  assert result.core == pytest.approx(np.mean(list(expected.values())))


def test_centered_accuracy_formula():
  assert core.centered_accuracy(0.25, 0.25) == 0.0
  assert core.centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
  assert core.centered_accuracy(0.0, 0.5) == pytest.approx(-1.0)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    core.centered_accuracy(0.5, 25.0)


@pytest.mark.parametrize("label", ["toy_choice", "toy_schema", "toy_lm"])
def test_prompts_hold_the_fewshot_examples(label):
  (task,) = core.load_bundle(BUNDLE, tasks=[label])
  for index in range(len(task.rows)):
    prompts = core.render_prompts(task, index, seed=7)
    shots = core.fewshot_indices(len(task.rows), index, task.num_fewshot, seed=7)
    assert len(shots) == task.num_fewshot and index not in shots
    assert shots == core.fewshot_indices(len(task.rows), index, task.num_fewshot, seed=7)
    for prompt in prompts:
      *examples, final = prompt.split(core.FEWSHOT_SEPARATOR)
      assert len(examples) == task.num_fewshot
      assert examples == [core._solved(task, task.rows[i]) for i in shots]
    if task.task_type == "multiple_choice":
      row = task.rows[index]
      assert [p.rsplit(core.FEWSHOT_SEPARATOR, 1)[1] for p in prompts] == [
        f"{row['query']} Answer: {c}" for c in row["choices"]
      ]
    if task.task_type == "language_modeling":
      without, with_continuation = prompts
      assert with_continuation.startswith(without)
      assert with_continuation.endswith(task.rows[index]["continuation"])


def test_scorer_sees_context_and_continuation_split_per_task_type():
  seen = {}

  def recording(label):
    def score(pairs):
      seen[label] = [(_decode(c), _decode(x)) for c, x in pairs]
      return tie_score_fn(pairs)

    return score

  for task in core.load_bundle(BUNDLE):
    core.evaluate_task(task, recording(task.label), TOKENIZER, max_examples=1)
  choice = seen["toy_choice"]  # one context, one continuation per choice
  assert len(choice) == 4 and len({c for c, _ in choice}) == 1
  assert choice[0][0].endswith("Answer: ") and choice[0][0].count("\n\n") == 2
  schema = seen["toy_schema"]  # one context per option, the same continuation
  assert len(schema) == 2 and len({x for _, x in schema}) == 1 and schema[0][0] != schema[1][0]
  ((context, continuation),) = seen["toy_lm"]
  assert context.endswith("\nAnswer:") and continuation.startswith(" ")


def test_split_prompts_keeps_a_continuation_token_when_one_choice_prefixes_another():
  pairs = core.split_prompts("multiple_choice", [[5, 1, 2], [5, 1, 2, 3]])
  assert pairs == [([5, 1], [2]), ([5, 1], [2, 3])]
  pairs = core.split_prompts("schema", [[5, 1, 9, 9], [5, 2, 9, 9]])
  assert pairs == [([5, 1], [9, 9]), ([5, 2], [9, 9])]


def _copy_bundle(tmp_path):
  bundle = tmp_path / "bundle"
  shutil.copytree(BUNDLE, bundle)
  return bundle


def test_missing_task_file_names_the_file_and_the_bundle(tmp_path):
  bundle = _copy_bundle(tmp_path)
  (bundle / "eval_data" / "toy" / "schema.jsonl").unlink()
  with pytest.raises(core.BundleError) as e:
    core.load_bundle(bundle)
  message = str(e.value)
  assert "toy/schema.jsonl" in message and str(bundle) in message and "toy_schema" in message


def test_bundle_errors(tmp_path):
  with pytest.raises(core.BundleError, match="does not exist"):
    core.load_bundle(tmp_path / "nowhere")
  with pytest.raises(core.BundleError, match="not in"):
    core.load_bundle(BUNDLE, tasks=["hellaswag"])
  bundle = _copy_bundle(tmp_path)
  data = bundle / "eval_data" / "toy" / "choice.jsonl"
  data.write_text(data.read_text() + '{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
  with pytest.raises(core.BundleError, match=r"choice.jsonl line 7 .*gold=2"):
    core.load_bundle(bundle)
  data.write_text('{"query": "q", "choices": ["a", "b"]}\n')
  with pytest.raises(core.BundleError, match=r"lacks \['gold'\]"):
    core.load_bundle(bundle)
  data.write_text("not json\n")
  with pytest.raises(core.BundleError, match="not valid JSON"):
    core.load_bundle(bundle)
  shutil.copy(BUNDLE / "eval_data" / "toy" / "choice.jsonl", data)
  meta = bundle / "eval_meta_data.csv"
  meta.write_text("\n".join(meta.read_text().splitlines()[:-1]) + "\n")  # drop toy_lm
  with pytest.raises(core.BundleError, match="'toy_lm' has no row"):
    core.load_bundle(bundle)
