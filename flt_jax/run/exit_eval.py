"""Per-token exit of a restored checkpoint (`--mode=eval --eval_exit=...`): every exit
rule evaluated teacher-forced on the validation data (on multihop also each trained hop
count alone) on the run's sharded evaluator, beside the fixed-K' curve, as one
quality-versus-compute table (`exit_step<N>.json`, `.csv`, `.png`).

Each rule's figures say which compute they are: mean_exit_loop (per target token),
mean_exit_loop_answers (per answer token), mean_exit_loop_inputs (per input token): the
loops decoding those tokens one at a time executes; executed_loops: the loop iterations
the teacher-forced pass ran per batch (a loop runs while any token of the batch is
active).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from etils import epath

from flt_jax.model.exit import ExitRule
from flt_jax.run import results as result_files
from flt_jax.run.sweep import RestoredCheckpoint, eval_data_record, hop_data_config

EXIT_HOPS_METRICS = ("answer_accuracy", "mean_exit_loop_answers", "executed_loops")


def rule_key(rule: ExitRule) -> str:
  """A rule's name in the table: criterion:threshold and its loop bounds."""
  return f"{rule.label} (loops {rule.min_loops}-{rule.max_loops})"


def rule_metrics(checkpoint: RestoredCheckpoint, rule: ExitRule) -> dict[str, float]:
  """One rule's metrics and compute over the validation data; on multihop each trained
  hop count's accuracy, mean exit loop over answers and executed loops (suffixed
  _hops<h>)."""
  run_setup, params = checkpoint.run_setup, checkpoint.params
  evaluator = run_setup.evaluator
  metrics = evaluator.exit_metrics(params, run_setup.eval_batches(), rule)
  if run_setup.config.data.source == "multihop":
    m = run_setup.config.data.multihop
    for hops in range(int(m.hops_min), int(m.hops_max) + 1):
      batches = run_setup.eval_batches(hop_data_config(run_setup.config.data, hops))
      per_hop = evaluator.exit_metrics(params, batches, rule)
      for name in EXIT_HOPS_METRICS:
        metrics[f"{name}_hops{hops}"] = per_hop[name]
  return metrics


def exit_checkpoint(
  checkpoint: RestoredCheckpoint,
  workdir: str,
  rules: Sequence[ExitRule],
  fixed: dict[int, dict],
) -> dict[str, dict]:
  """Evaluates each exit rule (rules with their max_loops set) and writes, from process
  0, `<workdir>/exit_step<N>.json` (rules and K' added to what earlier evaluations of the
  same step wrote), `exit_step<N>.csv` and `.png`; `fixed` is the fixed-K' curve
  ({K': metrics}). Returns {rule key: {criterion, threshold, min_loops, max_loops,
  metrics}}."""
  run_setup, step = checkpoint.run_setup, checkpoint.step
  suffix, data_record = eval_data_record(run_setup, checkpoint.saved_config)
  table_path = epath.Path(workdir) / f"exit_step{step}{suffix}.json"
  earlier = result_files.read_exit_table(table_path)  # a damaged table stops us before the work
  results = {}
  for rule in rules:
    results[rule_key(rule)] = {
      "criterion": rule.criterion,
      "threshold": rule.threshold,
      "min_loops": rule.min_loops,
      "max_loops": rule.max_loops,
      "metrics": rule_metrics(checkpoint, rule),
    }
  variant, trained = run_setup.model_cfg.variant, checkpoint.trained_loops
  result_files.print_exit(
    f"per-token exit, checkpoint step {step} of {workdir} ({variant}, trained at K={trained}):",
    fixed,
    results,
  )
  if jax.process_index() == 0:
    table = {"step": step, "trained_loops": trained, "data": data_record, **earlier}
    result_files.write_exit(workdir, table_path, f"exit_step{step}{suffix}", table, fixed, results)
  return results
