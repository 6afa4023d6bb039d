"""The run layer: a run assembled from its config, then trained or evaluated.

program.py   resolve_config, build_program -> Program: the data-free builder of the
             train and eval steps that training, evaluation and `flt_jax.aot` share
setup.py     setup -> RunSetup (a Program plus tokenizer and pipelines),
             open_checkpointer (the lock holder's writable checkpointer)
loop.py      train_and_evaluate: the train loop (sync-step rule, profiler window,
             preemption, non-finite stop, saves)
resume.py    restore_or_init: a fresh state or the latest checkpoint, with its checks
fits.py      the host batch and the compiled step against the memory there, before the
             workdir is touched
report.py    say, console/TensorBoard/metrics.jsonl lines, config.txt
results.py   evaluation's result files and tables (sweep, exit, CORE/lm-eval)
sweep.py     restore_checkpoint (read-only: the params and the saved config, read once),
             restore_params, evaluate_checkpoint / sweep_checkpoint (loop-count sweep)
exit_eval.py exit_checkpoint: per-token exit rules beside the fixed-K' curve
tasks.py     evaluate_tasks: the sweep, CORE, lm-eval and exit rules of a checkpoint at
             any K'
"""

from flt_jax.run.loop import NonFiniteError, train_and_evaluate
from flt_jax.run.program import Program, build_program, resolve_config
from flt_jax.run.results import HOP_METRIC
from flt_jax.run.setup import RunSetup, open_checkpointer, setup
from flt_jax.run.sweep import (
  RestoredCheckpoint,
  evaluate_checkpoint,
  hop_data_config,
  restore_checkpoint,
  restore_params,
)
from flt_jax.run.tasks import EvalTasks, TaskOptions, evaluate_tasks

__all__ = [
  "EvalTasks",
  "HOP_METRIC",
  "NonFiniteError",
  "Program",
  "RestoredCheckpoint",
  "RunSetup",
  "TaskOptions",
  "build_program",
  "evaluate_checkpoint",
  "evaluate_tasks",
  "hop_data_config",
  "open_checkpointer",
  "resolve_config",
  "restore_checkpoint",
  "restore_params",
  "setup",
  "train_and_evaluate",
]
