"""What checkpointing tells the user: its errors and every message they carry, one line
each, naming the directory and the way out. Only a checksum mismatch (established
damage) advises deleting a checkpoint; everything else says what is intact."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


class CheckpointSaveError(CheckpointError):
  """A save could not start (too little free space) or its asynchronous write failed."""


class CorruptCheckpointError(CheckpointError):
  """A restored checkpoint does not match what was recorded when it was saved."""


def mib(n: int) -> str:
  return f"{n / (1 << 20):,.1f} MiB"


def reason(e: BaseException) -> str:
  """The root cause in one short line: an OSError with its errno if there is one in the
  chain (Orbax wraps tensorstore's ENOSPC in a ValueError), else the first line."""
  seen, cur = set(), e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, OSError) and cur.errno:
      return f"{type(cur).__name__}: [Errno {cur.errno}] {os.strerror(cur.errno)}"
    cur = cur.__cause__ or cur.__context__
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if "No space left on device" in str(e):
    text = "No space left on device"
  return f"{type(e).__name__}: {text[:300]}"


# ---------------------------------------------------------------- finding a checkpoint
def no_directory(workdir, directory) -> str:
  return (
    f"no checkpoints in {workdir} ({directory} does not exist); check --workdir, or train "
    "first with --mode=train"
  )


def no_steps(directory) -> str:
  return f"no checkpoints in {directory}; train first with --mode=train"


def no_step(step: int, directory, steps: Sequence[int]) -> str:
  return f"no checkpoint for step {step} in {directory}; available: {list(steps)}"


def no_saved_config(step_dir) -> str:
  return f"the checkpoint {step_dir} has no saved config; pass --config"


def cannot_write(path, e: BaseException) -> str:
  return (
    f"Cannot write to {path}: {type(e).__name__}: {e}. Choose a writable --workdir (check "
    "that the path is not under a file, that the permissions allow writing and the disk "
    "is not full)."
  )


# --------------------------------------------------------------------------- saving
def space_line(directory, space: tuple[int, int] | None) -> str:
  if space is None:
    return ""
  return f" {directory} has {mib(space[0])} free of {mib(space[1])} (shutil.disk_usage)."


def kept_and_fix(saved_steps: Sequence[int]) -> str:
  if saved_steps:
    kept = f"the checkpoints already saved ({list(saved_steps)}) are intact"
    resume = f"resume from step {saved_steps[-1]}"
  else:
    kept = "no checkpoint had been saved yet"
    resume = "start again"
  return (
    f" Nothing already saved was changed: {kept}. Free space (or choose a --workdir on "
    f"a larger disk), then rerun the same command to {resume}."
  )


def save_failed(step: int, directory, e: BaseException, space: str, kept: str) -> str:
  return f"Saving the checkpoint for step {step} to {directory} failed: {reason(e)}." + space + kept


def no_room(step: int | None, directory, need: int, space: str, kept: str) -> str:
  what = f"Not saving step {step}" if step is not None else "Not starting"
  where = space or " Another host is short of space."
  return f"{what}: a checkpoint of this run in {directory} needs about {mib(need)}.{where}" + kept


def failed_on_other_hosts(directory, hosts: Sequence[int]) -> str:
  return (
    f"Saving a checkpoint to {directory} failed on host(s) {list(hosts)} (see their "
    "output); stopped. The checkpoints already saved are intact."
  )


def config_needed() -> str:
  return "a writable Checkpointer needs the run's config (saved with every step)"


def read_only(directory, step: int) -> str:
  return f"{directory} was opened read-only; not saving step {step}."


def reserved_item(name: str) -> str:
  return f"Extra checkpoint item name {name!r} is reserved."


# ------------------------------------------------------------------------ restoring
def move_aside(step_dir, previous: int | None) -> str:
  """The way out of a checkpoint that cannot be used: the previous one, or a fresh start."""
  if previous is not None:
    return (
      f"Move it aside (mv {step_dir} {step_dir}.bad) and rerun the same command to resume "
      f"from step {previous}, the previous checkpoint."
    )
  return f"It is the only checkpoint: move it aside (mv {step_dir} ...) to start again."


def record_missing(step_dir, legacy_item: bool, previous: int | None) -> str:
  what = "the tokenizer's identity and the checksums of everything saved"
  where = (
    f"its 'record' item ({what})"
    if legacy_item
    else f"its Orbax metadata file _CHECKPOINT_METADATA (which holds the record: {what})"
  )
  return (
    f"The checkpoint {step_dir} is damaged: {where} was saved but is missing, so it cannot "
    "be verified. " + move_aside(step_dir, previous)
  )


def corrupt_arrays(step_dir, bad: Sequence[str], previous: int | None) -> str:
  then = (
    f"rerun the same command to resume from step {previous}, the previous checkpoint"
    if previous is not None
    else "start again (it is the only checkpoint)"
  )
  shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
  return (
    f"The checkpoint {step_dir} is corrupt: {len(bad)} of its arrays ({shown}) do not "
    f"match the checksums written when it was saved. Delete it (rm -r {step_dir}) and "
    f"{then}."
  )


def corrupt_item(step_dir, name: str, previous: int | None) -> str:
  data_fix = (
    "Resume with --config.checkpoint.restore_data=False to keep the trained state and "
    "start the data stream afresh, or: "
    if name == "data"
    else ""
  )
  return (
    f"The checkpoint {step_dir} is corrupt: its {name!r} item ({step_dir}/{name}) does "
    "not match the checksum written when it was saved. " + data_fix + move_aside(step_dir, previous)
  )


def restore_failed(step_dir, e: BaseException, previous: int | None) -> str:
  # A failed read is not proof of damage (a changed state structure or pipeline fails
  # the same way), so nothing here advises deleting it.
  aside = (
    f"; if this run's code and config are those that saved it, the files may be damaged: "
    f"move it aside (mv {step_dir} {step_dir}.bad) to resume from step {previous}"
    if previous is not None
    else ""
  )
  return (
    f"Could not restore the checkpoint {step_dir}: {reason(e)}. It does not match what "
    "this run expects (another state structure or data pipeline), or its files are "
    f"incomplete{aside}. Nothing was deleted or overwritten."
  )


def other_param_shapes(step_dir, path: str, stored, want) -> str:
  return (
    f"the checkpoint {step_dir} holds params of another model shape than its config "
    f"describes (params{path}: stored {stored}, the config gives {want}); use the config "
    "it was trained with, or a workdir whose checkpoints match their saved config"
  )


# --------------------------------------------------------------------- the guard
def other_model_shape(diffs: Sequence[str]) -> str:
  return (
    "The checkpoints in this workdir were written by a model with a different shape ("
    + "; ".join(diffs)
    + "). Use a new --workdir for the new model, or restore the saved values "
    "(e.g. --config.model.<field>=<saved value>)."
  )


def describe_tokenizer(identity: Mapping) -> str:
  return (
    f"{identity.get('name')} tokenizer, vocab {identity.get('vocab_size')}, separator id "
    f"{identity.get('eos_id')}, sha256 {str(identity.get('sha256'))[:12]}"
  )


def other_tokenizer(where, saved: Mapping, current: Mapping) -> str:
  return (
    f"The checkpoint {where} was trained with another tokenizer (saved: "
    f"{describe_tokenizer(saved)}; now: {describe_tokenizer(current)}), so its token ids "
    "would stand for other text. Use the tokenizer it was trained with (the same "
    "data.tokenizer, data.tokenizer_path, and for a trained BPE the same training text: "
    "data.path, data.bpe_train_bytes, data.bpe_vocab_size), or a new --workdir."
  )


# ------------------------------------------------ warnings (older checkpoints go on)
def no_tokenizer_recorded(where, current: Mapping) -> str:
  return (
    f"{where} records no tokenizer (saved by an older version); not checked that this "
    f"run's tokenizer ({describe_tokenizer(current)}) is the one it was trained with."
  )


def no_checksums(step_dir) -> str:
  return f"{step_dir} has no checksums (saved by an older version); not verified."


def unknown_checksum_format(step_dir) -> str:
  return f"{step_dir}: unknown checksum format; not verified."


def item_not_checksummed(step_dir, name: str) -> str:
  return (
    f"{step_dir}: item {name!r} has no checksum for this process (older version); not verified."
  )
