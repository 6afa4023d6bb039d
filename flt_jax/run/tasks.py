"""Benchmarks of a checkpoint at any loop count K' (`--mode=eval --eval_tasks=...`):

  sweep                 validation loss, bpb, answer accuracy and h_change per K'
                        (run/sweep.py: eval_step<N>.json, loop_sweep_step<N>.csv/png)
  core                  the CORE in-context tasks of an eval bundle (eval/core.py)
  lm_eval:<task,...>    EleutherAI lm-eval tasks (eval/lm_eval_adapter.py; an optional
                        dependency, requirements-eval.txt); last in the list

and with --eval_exit=<criterion:threshold,...> per-token exit (run/exit_eval.py): each
rule against the fixed-K' curve (--eval_loops, default 1..max_loops), the
quality-versus-compute table exit_step<N>.json/csv/png.

One read-only restore, then each family at each K' on the run's sharded evaluator.
Process 0 writes `core_step<N>_loops<K>.json` and `lm_eval_step<N>_loops<K>.json`
(each whole) and prints a task x K' table. What can be checked before the restore is:
an unknown family, a missing or malformed bundle, lm-eval not installed, an unknown
lm-eval task.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import ml_collections

from flt_jax.eval import core
from flt_jax.model.exit import ExitRule, with_max_loops
from flt_jax.run import exit_eval, report
from flt_jax.run import results as result_files
from flt_jax.run.sweep import (
  RestoredCheckpoint,
  check_loops,
  fixed_curve,
  restore_checkpoint,
  sweep_checkpoint,
)

FAMILIES = ("sweep", "core")
LM_EVAL = "lm_eval:"
CORE_SEED = 1234  # few-shot draws and the example order


@dataclasses.dataclass(frozen=True)
class EvalTasks:
  """What --eval_tasks asks for."""

  sweep: bool = True
  core: bool = False
  lm_eval: tuple[str, ...] = ()

  @classmethod
  def parse(cls, text: str) -> EvalTasks:
    """'sweep,core,lm_eval:hellaswag,arc_easy': families, lm-eval's tasks last."""
    head, has_lm_eval, lm_eval_tasks = text.partition(LM_EVAL)
    names = [name.strip() for name in head.split(",") if name.strip()]
    lm_eval = tuple(t.strip() for t in lm_eval_tasks.split(",") if t.strip())
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or (has_lm_eval and not lm_eval) or not (names or lm_eval):
      raise ValueError(
        f"--eval_tasks={text} is invalid: it takes sweep, core and lm_eval:<task,...> "
        "(lm-eval's tasks last), e.g. --eval_tasks=sweep,core,lm_eval:hellaswag,arc_easy"
      )
    return cls(sweep="sweep" in names, core="core" in names, lm_eval=lm_eval)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  bundle: str = ""  # CORE: the eval bundle directory
  lm_eval_include: str = ""  # lm-eval: a directory of task YAMLs besides lm-eval's own
  max_examples: int | None = None  # per task (CORE's seeded subset, lm-eval's limit)
  max_len: int = 0  # tokens of context + continuation; 0: the model's seq_len
  # per-token exit rules (--eval_exit); a max_loops of 0 becomes the trained K
  exit_rules: tuple[ExitRule, ...] = ()


def _lm_eval_adapter(tasks: tuple[str, ...]):
  try:  # only here: lm-eval is optional, and slow to import
    return importlib.import_module("flt_jax.eval.lm_eval_adapter")
  except ImportError as e:
    raise ValueError(
      f"--eval_tasks=lm_eval:{','.join(tasks)} needs EleutherAI's lm-eval, which did not "
      f"import ({e.__cause__ or e}); install it: pip install -r requirements-eval.txt"
    ) from None


def evaluate_tasks(
  config: ml_collections.ConfigDict | None,
  workdir: str,
  tasks: EvalTasks,
  loops_list: list[int] | None = None,
  step: int | None = None,
  options: TaskOptions | None = None,
) -> dict:
  """Restores a checkpoint of workdir (default: the latest; `config` None: the config
  saved with it) and runs `tasks` at each K' (default: the trained K; with exit rules
  1..their max_loops): {'sweep': {K': metrics}, 'core': {K': CoreResult}, 'lm_eval':
  {K': results}} for those asked, and 'exit' ({rule: entry}, run/exit_eval.py) with
  options.exit_rules."""
  check_loops(loops_list)
  options = options or TaskOptions()
  core_tasks = adapter = manager = None
  if tasks.core:
    if not options.bundle:
      raise ValueError(
        "--eval_tasks=core needs --eval_bundle=DIR, the directory holding core.yaml, "
        "eval_meta_data.csv and eval_data/ (e.g. DCLM's or nanochat's eval_bundle)"
      )
    core_tasks = core.load_bundle(options.bundle)
  if tasks.lm_eval:
    adapter = _lm_eval_adapter(tasks.lm_eval)
    manager = adapter.task_manager(tasks.lm_eval, options.lm_eval_include or None)
  checkpoint = restore_checkpoint(workdir, config, step)
  rules = [
    rule if rule.max_loops else with_max_loops(rule, checkpoint.trained_loops)
    for rule in options.exit_rules
  ]
  default_loops = [checkpoint.trained_loops]
  if rules:  # the fixed-K' curve the rules are set against
    default_loops = list(range(1, max(rule.max_loops for rule in rules) + 1))
  loops_list = sorted(set(loops_list or default_loops))
  max_len = options.max_len or checkpoint.run_setup.model_cfg.seq_len
  out = {}
  if tasks.sweep:
    out["sweep"] = sweep_checkpoint(checkpoint, workdir, loops_list)
  if rules:
    fixed = out.get("sweep") or fixed_curve(checkpoint, loops_list)
    out["exit"] = exit_eval.exit_checkpoint(checkpoint, workdir, rules, fixed)
  if core_tasks is not None:
    out["core"] = _core(checkpoint, workdir, loops_list, core_tasks, options, max_len)
  if adapter is not None:
    out["lm_eval"] = _lm_eval(
      checkpoint, workdir, loops_list, adapter, manager, tasks, options, max_len
    )
  return out


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _about(checkpoint: RestoredCheckpoint, workdir: str) -> str:
  variant, trained = checkpoint.run_setup.model_cfg.variant, checkpoint.trained_loops
  return f"checkpoint step {checkpoint.step} of {workdir} ({variant}, trained at K={trained})"


def _core(checkpoint, workdir, loops_list, core_tasks, options, max_len) -> dict:
  run_setup, params, step = checkpoint.run_setup, checkpoint.params, checkpoint.step
  results, table = {}, {}
  for k in loops_list:
    result = core.score_core(
      core_tasks,
      run_setup.evaluator.score_fn(params, k, max_len),
      run_setup.tokenizer,
      max_examples=options.max_examples,
      seed=CORE_SEED,
      log=lambda line, k=k: report.say(f"  K={k} {line}"),
    )
    results[k] = result
    record = {
      "step": step,
      "loops": k,
      "trained_loops": checkpoint.trained_loops,
      "bundle": _absolute(options.bundle),
      "max_examples": options.max_examples,
      "max_len": max_len,
      "seed": CORE_SEED,
      "core": result.core,
      "tasks": {label: dataclasses.asdict(r) for label, r in result.tasks.items()},
    }
    path = result_files.write_task_results(workdir, "core", step, k, record)
    report.say(f"wrote {path}")
    for label, r in result.tasks.items():
      table.setdefault(label, {})[k] = r.centered
    table.setdefault("CORE", {})[k] = result.core
  result_files.print_task_table(f"CORE (centred accuracy), {_about(checkpoint, workdir)}:", table)
  return results


def _lm_eval(checkpoint, workdir, loops_list, adapter, manager, tasks, options, max_len) -> dict:
  run_setup, params, step = checkpoint.run_setup, checkpoint.params, checkpoint.step
  results, table = {}, {}
  for k in loops_list:
    lm = adapter.FltLM.from_evaluator(
      run_setup.evaluator, params, run_setup.tokenizer, loops=k, max_length=max_len
    )
    out = adapter.evaluate(lm, tasks.lm_eval, manager, limit=options.max_examples)
    results[k] = out
    record = {
      "step": step,
      "loops": k,
      "trained_loops": checkpoint.trained_loops,
      "tasks": list(tasks.lm_eval),
      "limit": options.max_examples,
      "max_len": max_len,
      **out,
    }
    path = result_files.write_task_results(workdir, "lm_eval", step, k, record)
    report.say(f"wrote {path}")
    for task, metrics in out["results"].items():
      for metric, value in metrics.items():
        # lm-eval names a metric "<metric>,<filter>"; its other keys (alias, sample_len)
        # and the standard errors stay in the file.
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and "," in metric and "_stderr" not in metric:
          table.setdefault(f"{task} {metric}", {})[k] = float(value)
  result_files.print_task_table(f"lm-eval, {_about(checkpoint, workdir)}:", table)
  return results
