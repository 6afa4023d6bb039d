"""`--mode=eval --eval_tasks=...`: the loop sweep, CORE and lm-eval tasks of a workdir's
checkpoint at several K' from one command, one results file per step and K' and a
table; CORE and lm-eval accuracies equal those of a plain unsharded float64 scorer on the
restored params; what can be refused before the restore is (unknown families, a missing
bundle, lm-eval not installed, a bad exit rule), in one line; --eval_exit's
quality-versus-compute table."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from flt_jax import presets, run
from flt_jax.eval import core, exit_report
from flt_jax.model import exit as exit_lib

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tests" / "fixtures" / "eval_bundle"
LM_EVAL_FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"
MAX_LEN = 32
EOS = 256  # the bytes tokenizer's document separator


def _config():
  c = presets.make("FLT", 2, "cpu")
  c.model.update(dict(n_layer=1, d_model=32, n_head=1, n_kv_head=1, seq_len=MAX_LEN))
  c.data.update(dict(source="stdlib", tokenizer="bytes"))
  c.train.update(
    dict(steps=2, micro_batch_size=4, total_batch_tokens=4 * MAX_LEN, eval_every=0, eval_steps=1)
  )
  c.checkpoint.update(dict(every_steps=2))
  c.mesh.cpu_devices = 0  # one device, as in this process
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tasks")
  run.train_and_evaluate(_config(), str(path))
  return path


def _main(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "flt_jax.main", "--mode=eval", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _lm_eval_task_dir(tmp_path) -> Path:
  """A multiple-choice lm-eval task on a local JSONL file (no download)."""
  task = {
    "task": "flt_choice",
    "dataset_path": "json",
    "dataset_kwargs": {
      "data_files": {"test": str(LM_EVAL_FIXTURES / "choice.jsonl")},
      "cache_dir": str(tmp_path / "hf_cache"),
    },
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_choice": "choices",
    "doc_to_target": "gold",
    "metric_list": [{"metric": "acc"}],
  }
  task_dir = tmp_path / "tasks"
  task_dir.mkdir()
  (task_dir / "flt_choice.yaml").write_text(yaml.safe_dump(task))
  return task_dir


def _plain_score_fn(model, params, loops):
  """A ScoreFn from unpadded, unsharded forwards and a float64 log-softmax."""
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t, loops))

  def score(pairs):
    out = []
    for context, continuation in pairs:
      sequence = (list(context) + list(continuation))[-(MAX_LEN + 1) :]
      logits = np.asarray(forward(params, np.asarray([sequence[:-1]], np.int32))[0], np.float64)
      shifted = logits - logits.max(-1, keepdims=True)
      logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
      n = len(continuation)
      rows, targets = np.arange(len(sequence) - 1)[-n:], np.asarray(sequence[1:])[-n:]
      greedy = bool(np.all(logits[rows].argmax(-1) == targets))
      out.append((float(logprobs[rows, targets].sum()), greedy))
    return out

  return score


@pytest.mark.needs_extra
def test_sweep_core_and_lm_eval_from_one_command(workdir, tmp_path):
  pytest.importorskip(
    "lm_eval", reason="lm-eval is an optional dependency: pip install -r requirements-eval.txt"
  )
  task_dir = _lm_eval_task_dir(tmp_path)
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  proc = _main(
    f"--workdir={workdir}",
    "--eval_tasks=sweep,core,lm_eval:flt_choice",
    f"--eval_bundle={BUNDLE}",
    f"--eval_lm_eval_include={task_dir}",
    "--eval_loops=1,2",
    "--eval_max_examples=2",
    env=env,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  assert "CORE (centred accuracy), checkpoint step 2" in out and "lm-eval, checkpoint step 2" in out
  assert "flt_choice acc,none" in out
  assert (workdir / "eval_step2.json").exists()  # the sweep ran from the same restore

  run_setup, params, _ = run.restore_params(str(workdir))
  tasks = core.load_bundle(BUNDLE)
  docs = [json.loads(line) for line in (LM_EVAL_FIXTURES / "choice.jsonl").read_text().splitlines()]
  for loops in (1, 2):
    record = json.loads((workdir / f"core_step2_loops{loops}.json").read_text())
    assert (record["step"], record["loops"], record["max_len"]) == (2, loops, MAX_LEN)
    score = _plain_score_fn(run_setup.model, params, loops)
    want = core.score_core(tasks, score, run_setup.tokenizer, max_examples=2, seed=1234)
    assert record["core"] == pytest.approx(want.core, abs=1e-9)
    for label, result in want.tasks.items():
      assert record["tasks"][label]["accuracy"] == result.accuracy
      assert record["tasks"][label]["examples"] == 2

    lm_record = json.loads((workdir / f"lm_eval_step2_loops{loops}.json").read_text())
    assert lm_record["loops"] == loops and lm_record["limit"] == 2
    # lm-eval's multiple choice: the choice with the highest summed log-probability.
    correct = []
    for doc in docs[:2]:
      context = [EOS, *f"Question: {doc['question']}\nAnswer:".encode()]
      scores = score([(context, list(f" {c}".encode())) for c in doc["choices"]])
      correct.append(int(np.argmax([s for s, _ in scores])) == doc["gold"])
    assert lm_record["results"]["flt_choice"]["acc,none"] == pytest.approx(np.mean(correct))
  assert not list(workdir.glob(".*.tmp"))  # every file written whole, no leftovers


def test_eval_tasks_flag_is_parsed_or_refused():
  parse = run.EvalTasks.parse
  assert parse("sweep") == run.EvalTasks(sweep=True)
  assert parse("core") == run.EvalTasks(sweep=False, core=True)
  assert parse("core,lm_eval:hellaswag, arc_easy") == run.EvalTasks(
    sweep=False, core=True, lm_eval=("hellaswag", "arc_easy")
  )
  for bad in ("", "cor", "lm_eval", "lm_eval:", "core,lm_eval:"):
    with pytest.raises(ValueError, match="it takes sweep, core and lm_eval:<task,...>"):
      parse(bad)


def test_what_can_be_refused_is_refused_before_the_restore(tmp_path, monkeypatch):
  """An empty workdir would fail at the restore; these fail first, naming the fix."""
  empty = str(tmp_path / "empty")
  evaluate = functools.partial(run.evaluate_tasks, None, empty, loops_list=[1])
  core_only = run.EvalTasks(sweep=False, core=True)
  with pytest.raises(ValueError, match="--eval_tasks=core needs --eval_bundle=DIR"):
    evaluate(core_only)
  with pytest.raises(core.BundleError, match="does not exist"):
    evaluate(core_only, options=run.TaskOptions(bundle=str(tmp_path / "nowhere")))
  with pytest.raises(ValueError, match="no checkpoints"):  # the bundle itself is fine
    evaluate(core_only, options=run.TaskOptions(bundle=str(BUNDLE)))
  # lm-eval missing: the adapter's import fails (sys.modules None makes `import` raise).
  monkeypatch.setitem(sys.modules, "lm_eval", None)
  monkeypatch.delitem(sys.modules, "flt_jax.eval.lm_eval_adapter", raising=False)
  with pytest.raises(ValueError, match=r"needs EleutherAI's lm-eval.*requirements-eval.txt"):
    evaluate(run.EvalTasks(sweep=False, lm_eval=("hellaswag",)))
  assert not (tmp_path / "empty").exists()


def test_lm_eval_missing_is_one_line_at_the_command(tmp_path):
  """An environment where lm-eval does not import: the command's last line says so."""
  shadow = tmp_path / "shadow" / "lm_eval"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{REPO}")
  proc = _main(f"--workdir={tmp_path / 'run'}", "--eval_tasks=lm_eval:hellaswag", env=env)
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
  assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1]
  assert "needs EleutherAI's lm-eval" in errors[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


def test_exit_rules_are_set_against_the_fixed_loop_counts(workdir):
  """--eval_exit (here through evaluate_tasks, as main passes it): the table holds the
  fixed K' curve and every rule; threshold 0 is the trained K's figures."""
  rules = tuple(exit_lib.parse_exit_list("latent_diff:0,kl:1e-3", flag="--eval_exit", max_loops=0))
  out = run.evaluate_tasks(
    None, str(workdir), run.EvalTasks(sweep=False), options=run.TaskOptions(exit_rules=rules)
  )
  assert sorted(out) == ["exit"]
  table = json.loads((workdir / "exit_step2.json").read_text())
  assert sorted(table["fixed"]) == ["1", "2"]  # default: 1 .. max_loops (the trained K=2)
  names = ["latent_diff:0 (loops 1-2)", "kl:0.001 (loops 1-2)"]
  assert sorted(table["exit"]) == sorted(names)
  never = table["exit"][names[0]]["metrics"]
  assert never["loss"] == pytest.approx(table["fixed"]["2"]["loss"], rel=1e-6)
  assert never["mean_exit_loop"] == never["executed_loops"] == 2.0
  fired = table["exit"][names[1]]
  assert (fired["criterion"], fired["threshold"], fired["max_loops"]) == ("kl", 1e-3, 2)
  assert 1.0 <= fired["metrics"]["mean_exit_loop"] <= 2.0
  rows = exit_report.read_exit_csv(workdir / "exit_step2.csv")
  assert [r["rule"] for r in rows] == ["K'=1", "K'=2", *names]
  assert float(rows[1]["mean_loops"]) == 2.0 and rows[2]["kind"] == "exit"
  assert (workdir / "exit_step2.png").stat().st_size > 0
  # a second evaluation adds to the table
  run.evaluate_tasks(
    None,
    str(workdir),
    run.EvalTasks(sweep=False),
    loops_list=[1],
    options=run.TaskOptions(exit_rules=rules[:1]),
  )
  again = json.loads((workdir / "exit_step2.json").read_text())
  assert sorted(again["fixed"]) == ["1", "2"] and sorted(again["exit"]) == sorted(names)


def test_a_bad_exit_rule_is_one_line_before_the_restore(tmp_path):
  proc = _main(f"--workdir={tmp_path / 'run'}", "--eval_exit=latent_diff:0.01,entropy:1")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --eval_exit=entropy:1 is invalid: unknown criterion 'entropy'")
  assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
  proc = _main(f"--workdir={tmp_path / 'run'}", "--eval_exit=kl:1e-3", "--eval_min_loops=0")
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: flag --eval_min_loops=0: 0 is not a positive integer (--help lists the flags)"
  )
