"""The train loop: `train_and_evaluate(config, workdir)`.

Steps are counted on the host: step n is the n-th batch, whether its update was applied
or skipped as non-finite (state.step + state.nonfinite_total). Device values are read
only on sync steps (`SyncRule`: log steps, eval steps, checkpoint steps, the last step
and a preemption), so dispatch runs ahead of the device in between. The stop rule stays
exact: once `train.max_consecutive_nonfinite` updates in a row were skipped, the train
step leaves the state unchanged, so the next sync finds the step that tripped it and the
run stops there without saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal

import jax
import ml_collections
from etils import epath

from flt_jax.data import pipeline as data_pipeline
from flt_jax.eval import evaluate as eval_lib
from flt_jax.run import fits, report, resume
from flt_jax.run.setup import RunSetup, open_checkpointer, setup
from flt_jax.train import step as step_lib
from flt_jax.train.checkpoint import Checkpointer, PreemptionHandler, ensure_writable_dir
from flt_jax.workdir_lock import WorkdirLock


class NonFiniteError(RuntimeError):
  """train.max_consecutive_nonfinite updates in a row had a non-finite loss or gradient."""


def fetch(tree):
  """The loop's one way of reading device values (on sync steps only)."""
  return jax.device_get(tree)


@dataclasses.dataclass(frozen=True)
class SyncRule:
  """Which steps read the device. `step` below is the number of steps done."""

  start: int
  total: int
  log_every: int
  eval_every: int

  def logs(self, step: int) -> bool:
    """The step about to run (step + 1) logs: the first of this start, every log_every-th,
    the last. Log steps run the diagnostics variant of the train step."""
    return step == self.start or (step + 1) % self.log_every == 0 or step + 1 == self.total

  def evaluates(self, step: int) -> bool:
    return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.total)


class ProfilerWindow:
  """A jax.profiler trace of steps [first, last) (`train.profile_steps` = "first,last")
  into <workdir>/profile."""

  def __init__(self, profile_steps: str, workdir: str):
    self._window = tuple(int(s) for s in profile_steps.split(",")) if profile_steps else None
    self._dir = str(epath.Path(workdir) / "profile")
    self._tracing = False

  def before_step(self, step: int, state) -> None:
    if self._window is None:
      return
    first, last = self._window
    if step == first and not self._tracing:
      jax.profiler.start_trace(self._dir)
      self._tracing = True
    elif self._tracing and step == last:
      jax.block_until_ready(state)
      self.close()
      report.say(f"profile of steps {first}..{last} written to {self._dir}")

  def close(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False


def _check_counters(counters: dict, skipped_seen: int, step: int, limit: int, checkpointer) -> int:
  """Reports non-finite updates skipped since the last sync; NonFiniteError once `limit`
  came in a row. Returns the skipped total."""
  skipped = int(counters["skipped"])
  if skipped > skipped_seen:
    report.say(
      f"step {step}: {skipped - skipped_seen} non-finite update(s) skipped since the last "
      f"report ({int(counters['in_a_row'])} in a row, {skipped} in all)"
    )
  if counters["in_a_row"] >= limit:
    saved = checkpointer.all_steps()
    kept = (
      f"The last good checkpoint (step {saved[-1]}) in {checkpointer.directory} is intact"
      if saved
      else f"No checkpoint had been saved yet in {checkpointer.directory}"
    )
    raise NonFiniteError(
      f"{limit} consecutive non-finite updates at step "
      f"{int(counters['applied']) + skipped}; stopping. {kept}. Lower "
      "optim.matrix_lr/embedding_lr, set optim.grad_clip, or try model.dtype=float32."
    )
  return skipped


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final metrics."""
  run_setup = setup(config, workdir, training=True)
  fits.check_host_batch(run_setup)
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
  lock.check()  # a second run is refused before it compiles anything
  # Compiled now, before the workdir is touched, so a step that cannot fit a device is
  # refused with XLA's estimate; the loop runs these executables.
  steps = {d: run_setup.compile_train_step(d) for d in (False, True)}
  for diagnostics, compiled in steps.items():
    fits.check_step(run_setup, compiled, f"the train step{' (diagnostics)' if diagnostics else ''}")
  ensure_writable_dir(workdir)  # a clear error for a workdir under a file or read-only
  # One run per workdir (process 0 holds it); a stale lock from a killed run is taken over.
  # Taken before the checkpointer opens: opening it writable cleans up unfinished saves,
  # which would delete a live run's in-flight save if a second run got that far.
  lock.acquire()
  try:
    checkpointer = open_checkpointer(run_setup, workdir, read_only=False)
    return _train(run_setup, checkpointer, workdir, steps)
  finally:
    lock.release()


def _train(run_setup: RunSetup, checkpointer: Checkpointer, workdir: str, steps: dict) -> dict:
  """Restores or initialises the state, then trains to the horizon. Whatever ends it,
  the checkpointer (an in-flight save completes: nothing saved is lost), the profiler
  and the writers are closed; on an error the original error is what the user sees."""
  closers = [checkpointer.close]
  try:
    start, step, preempted, reporter = _train_steps(
      run_setup, checkpointer, workdir, steps, closers
    )
  except BaseException:
    for close in reversed(closers):
      with contextlib.suppress(Exception):
        close()
    raise
  for close in reversed(closers):
    close()  # a failed last save is raised here, before any summary
  if preempted:
    report.say(
      f"stopped by a signal: saved step {step} to {checkpointer.directory}; rerun the same "
      "command to resume"
    )
    return {"step": step, "preempted": True}
  if step == start:
    report.say(
      f"already at step {step} of {run_setup.total_steps}; raise --config.train.steps to train on"
    )
    return {"step": step, "first_loss": None, "final_loss": None}
  return reporter.summary(step)


def _train_steps(run_setup: RunSetup, checkpointer: Checkpointer, workdir: str, steps, closers):
  """The steps from the restored (or fresh) state to the horizon or a preemption:
  (start, step reached, preempted, reporter)."""
  config, total_steps = run_setup.config, run_setup.total_steps
  train_iter = iter(run_setup.train_pipeline)
  report.say(run_setup.describe_devices())
  # A disk that cannot hold one checkpoint stops the run now, not at its first save.
  checkpointer.check_space(run_setup.abstract_state)
  state = resume.restore_or_init(run_setup, checkpointer, train_iter)
  report.write_config(config, workdir)
  counters = fetch({"applied": state.step, "skipped": state.nonfinite_total})
  start, skipped_seen = int(counters["applied"] + counters["skipped"]), int(counters["skipped"])

  train_step, train_step_diag = steps[False], steps[True]
  step_keys = step_lib.batch_keys(run_setup.model_cfg)
  eval_fn = run_setup.make_eval_fn()
  reporter = report.Reporter(run_setup, workdir, start)
  closers.append(reporter.close)
  profiler = ProfilerWindow(config.train.profile_steps, workdir)
  closers.append(profiler.close)
  sync = SyncRule(start, total_steps, config.train.log_every, config.train.eval_every)
  single_host = jax.process_count() == 1

  # Ctrl-C is treated like preemption: save the step reached, then exit.
  signals = (signal.SIGTERM, signal.SIGINT)
  with PreemptionHandler(checkpointer.reached_preemption, signals) as preemption:
    step = start
    while step < total_steps:
      profiler.before_step(step, state)
      batch = run_setup.global_batch(next(train_iter), step_keys, run_setup.global_batch_size)
      log_now = sync.logs(step)
      state, metrics = (train_step_diag if log_now else train_step)(state, batch)
      step += 1
      if single_host:  # host-only look: a failed background save stops the run here
        checkpointer.check_save()
      eval_now = sync.evaluates(step)
      save_now = step == total_steps or checkpointer.should_save(step)
      preempted = preemption.should_stop(step)
      if not (log_now or eval_now or save_now or preempted):
        continue  # nothing read from the device: the next step is dispatched at once

      # Sync step: one read of the counters (and of the metrics on log steps).
      counters, host_metrics = fetch(
        (
          {
            "applied": state.step,
            "in_a_row": state.nonfinite_in_a_row,
            "skipped": state.nonfinite_total,
          },
          metrics if log_now else None,
        )
      )
      if not single_host:  # every host stops at the same sync step
        checkpointer.check_save_all_hosts()
      skipped_seen = _check_counters(
        counters, skipped_seen, step, config.train.max_consecutive_nonfinite, checkpointer
      )
      if log_now:
        reporter.train(step, host_metrics, skipped_seen)
      if eval_now:
        reporter.eval(
          step,
          eval_lib.evaluate(
            eval_fn,
            state.params,
            run_setup.eval_batches(),
            run_setup.token_bytes_V,
            loops=run_setup.model_cfg.loops,
          ),
        )
      if save_now or preempted:
        # Orbax's policy decides interval saves (and the multi-host preemption step); the
        # last step and a preemption are forced.
        checkpointer.save(
          step,
          state,
          {"data": data_pipeline.checkpoint_args_save(train_iter)},
          force=step == total_steps or preempted,
          extra_states={"data": train_iter.get_state()},
        )
      if preempted:
        return start, step, True, reporter
  return start, step, False, reporter
