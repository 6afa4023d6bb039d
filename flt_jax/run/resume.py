"""Where a training run starts: a fresh state, or the workdir's latest checkpoint with the
checks a resume needs (the data stream's settings, the learning-rate schedule) and the
data iterator's position restored and verified."""

from __future__ import annotations

from flt_jax.data import config as data_config_lib
from flt_jax.data import pipeline as data_pipeline
from flt_jax.errors import config_error
from flt_jax.run.report import say
from flt_jax.run.setup import RunSetup
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train.checkpoint import Checkpointer


def restore_or_init(
  run_setup: RunSetup, checkpointer: Checkpointer, train_iter
) -> state_lib.TrainState:
  """The state to train from: fresh (born sharded) in an empty workdir, else the latest
  checkpoint's, with `train_iter` moved to the position saved with it
  (`checkpoint.restore_data`) and that position checked against its checksum."""
  latest = checkpointer.latest_step()
  if latest is None:
    return run_setup.init_state()
  saved = checkpointer.saved_config(latest)  # read once: the guard read it at open
  warn_if_schedule_changed(run_setup, saved, latest)
  data_item, verify = {}, {}
  if run_setup.config.checkpoint.restore_data:
    check_data_stream(run_setup, saved, checkpointer.directory / str(latest))
    data_item = {"data": data_pipeline.checkpoint_args_restore(train_iter)}
    verify = {"data": train_iter.get_state}  # the position as restored, checksummed
  state = checkpointer.restore(latest, run_setup.restore_target, data_item, verify)["state"]
  fresh = "" if data_item else " (data stream restarted: checkpoint.restore_data=False)"
  say(f"resumed from {checkpointer.directory} at step {latest}{fresh}")
  return state


def warn_if_schedule_changed(run_setup: RunSetup, saved: dict | None, step: int) -> None:
  """Resuming with another train.steps recomputes the constant-then-warm-down schedule
  for the new length; say what the learning rate does at the resumed step."""
  old_steps = int(((saved or {}).get("train") or {}).get("steps", 0) or 0)
  new_steps = run_setup.total_steps
  if old_steps < 1 or old_steps == new_steps:
    return
  optim = run_setup.config.optim

  def multiplier(total):
    return optim_lib.lr_multiplier(step, total, optim.warmup_steps, optim.warmdown_frac)

  say(
    f"warning: train.steps changed from {old_steps} to {new_steps} on resume; the "
    f"learning-rate schedule is recomputed for {new_steps} steps, so at step {step} its "
    f"multiplier goes from {multiplier(old_steps):.3f} (old schedule) to "
    f"{multiplier(new_steps):.3f} and follows the new schedule (warm-down to 0 over the "
    f"last {optim.warmdown_frac:.0%} of {new_steps} steps)"
  )


def check_data_stream(run_setup: RunSetup, saved: dict | None, step_dir) -> None:
  """The saved data-iterator state resumes only the pipeline that wrote it: a changed
  data setting (data.num_workers, shuffle, shuffle_window_rows, the corpus, ...) is
  refused here, naming it, instead of failing inside grain's set_state."""
  changes = data_config_lib.stream_changes(((saved or {}).get("data")), run_setup.config.data)
  if not changes:
    return
  field, before, now = changes[0]
  others = "".join(f", {f} (saved {b!r}, now {n!r})" for f, b, n in changes[1:])
  flags = " ".join(f"--config.{f}={b}" for f, b, _ in changes)
  raise config_error(
    field,
    now,
    f"the checkpoint {step_dir} saved the data stream's position for {field}={before!r}"
    f"{' (also changed: ' + others[2:] + ')' if others else ''}, and that position does "
    "not carry over to another data pipeline",
    f"resume with the saved value(s) ({flags}), or add --config.checkpoint.restore_data=False "
    "to keep the trained state and start the new data stream from its beginning, or use a "
    "new --workdir",
  )
