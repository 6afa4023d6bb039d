"""`Checkpointer`: an Orbax CheckpointManager over `<workdir>/checkpoints`.

Orbax applies the save interval (`checkpoint.every_steps`), keeps the newest
`checkpoint.keep` steps and writes asynchronously. This wrapper adds what a run needs
around it: the run's config and a record (the tokenizer's identity, checksums of the
state's arrays) saved with every step and checked against the workdir's (`guard`,
`integrity`), the state restored onto a given abstract state (its shapes, dtypes and
shardings) and verified, extra items such as the data iterator, a free-space check
before each save, a failed asynchronous save surfaced at the next step (`check_save`),
and errors that name the directory and the way out. Nothing here deletes a checkpoint
except Orbax's keep-N after a successful save; only a checksum mismatch (established
damage) advises deleting one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from flt_jax.train.checkpoint import guard, integrity

STATE_ITEM = "state"
CONFIG_ITEM = "config"
# {"tokenizer": identity, "checksum_format": ..., "checksums": {key path: [plain, weighted]}}
RECORD_ITEM = "record"
_RESERVED_ITEMS = (STATE_ITEM, CONFIG_ITEM, RECORD_ITEM)
# Besides the arrays' own bytes a checkpoint holds small metadata and JSON items.
_SAVE_OVERHEAD_BYTES = 1 << 20


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


class CheckpointSaveError(CheckpointError):
  """A save could not start (too little free space) or its asynchronous write failed."""


class CorruptCheckpointError(CheckpointError):
  """A restored state does not match the checksums written when it was saved."""


def _mib(n: int) -> str:
  return f"{n / (1 << 20):,.1f} MiB"


def _reason(e: BaseException) -> str:
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


class _HeldOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save as several ERRORs, one with a traceback of
  hundreds of lines; the Checkpointer reports the failure itself in one message. So
  while a Checkpointer is open, Orbax's ERROR records are held back (first line only);
  `close` logs them as warnings unless a failure was already reported."""

  def __init__(self):
    super().__init__()
    self.held: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      lines = record.getMessage().strip().splitlines()
      self.held.append(lines[0][:300] if lines else "")
      return False
    return True


def ensure_writable_dir(path) -> epath.Path:
  """Creates `path` and writes/deletes a probe file; clear error if it fails."""
  path = epath.Path(path)
  probe = path / f".write_probe.{jax.process_index()}.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # OSError locally, various for remote filesystems.
    raise ValueError(
      f"Cannot write to {path}: {type(e).__name__}: {e}. Choose a writable "
      "--workdir (check that the path is not under a file, that the permissions allow "
      "writing and the disk is not full)."
    ) from e
  return path


def _local_path(path: epath.Path) -> str | None:
  text = os.fspath(path)
  return None if "://" in text else text


def _state_bytes(state) -> int:
  def nbytes(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return int(leaf.nbytes) if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes

  return sum(nbytes(leaf) for leaf in jax.tree.leaves(state))


def _all_hosts(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
  return bool(np.all(flags))


class Checkpointer:
  """Saves and restores {state, config, record, extra items} under `<workdir>/checkpoints`.

  Args:
    workdir: run directory (local path or any etils.epath URL such as gs://...).
    config: the run's config (ConfigDict or dict), saved as JSON with every checkpoint.
      If the workdir already has checkpoints, the latest one's config must describe a
      model of the same shape (`guard.check_compatible`), else ValueError.
    every_steps: Orbax saves at multiples of this (`save` without `force`).
    keep: number of checkpoints to keep (0 keeps all).
    async_save: write in a background thread (`wait_until_finished` joins it).
    tokenizer: the tokenizer's identity (`Tokenizer.identity()`), recorded with every
      checkpoint; a workdir whose latest checkpoint recorded another one is refused
      (`guard.check_tokenizer`). None: neither recorded nor checked.
    read_only: for readers (eval, sample, export) beside a possibly live run: nothing is
      created, written, deleted or cleaned up (Orbax's read_only manager), and `save`
      is refused. Only the run holding the workdir lock opens it writable: a writable
      manager removes unfinished saves, which would delete a live run's in-flight save.

  Every save also records checksums of the state's arrays (`integrity`); `restore`
  verifies them and raises CorruptCheckpointError on a mismatch.
  """

  def __init__(
    self,
    workdir,
    *,
    config,
    every_steps: int,
    keep: int,
    async_save: bool,
    tokenizer: Mapping[str, Any] | None = None,
    read_only: bool = False,
  ):
    self._read_only = bool(read_only)
    if self._read_only:
      self._directory = epath.Path(workdir) / "checkpoints"
      if not self._directory.is_dir():
        raise ValueError(
          f"no checkpoints in {workdir} ({self._directory} does not exist); check --workdir, "
          "or train first with --mode=train"
        )
    else:
      self._directory = ensure_writable_dir(epath.Path(workdir) / "checkpoints")
    self._config = guard.config_json(config)
    self._tokenizer = dict(tokenizer) if tokenizer is not None else None
    self._pending: int | None = None  # step of an asynchronous save not yet confirmed
    self._failed = False
    if self._read_only:
      with _quiet_absl():  # Orbax warns which options read_only turns off
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) or None,
        enable_async_checkpointing=bool(async_save),
        create=True,
        # Unfinished saves (`<step>.orbax-checkpoint-tmp*`, e.g. left by a full disk or a
        # killed run) are removed at start; finished checkpoints are never touched by
        # this. Only the lock holder gets here (read_only above for everyone else).
        cleanup_tmp_directories=True,
        # The interval alone: not Orbax's default extra save at the first step of a fresh
        # run; preemption saves are forced by the loop (PreemptionHandler).
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(int(every_steps)),
      )
    self._log_filter = _HeldOrbaxErrors()
    logging.getLogger("absl").addFilter(self._log_filter)
    with _quiet_absl() if self._read_only else contextlib.nullcontext():
      self._manager = ocp.CheckpointManager(self._directory, options=options)
    latest = self.latest_step()
    if latest is not None:
      saved = self.restore_config(latest)
      if saved is not None:
        guard.check_compatible(saved, self._config)
      if self._tokenizer is not None:
        record = self.restore_record(latest, required=True)
        guard.check_tokenizer(
          (record or {}).get("tokenizer"), self._tokenizer, self._step_dir(latest)
        )

  @classmethod
  def from_config(
    cls, workdir, config, tokenizer: Mapping[str, Any] | None = None, read_only: bool = False
  ) -> Checkpointer:
    """Built from `config.checkpoint` (every_steps, keep, async_save)."""
    c = config.checkpoint
    return cls(
      workdir,
      config=config,
      every_steps=c.every_steps,
      keep=c.keep,
      async_save=c.async_save,
      tokenizer=tokenizer,
      read_only=read_only,
    )

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would write (Orbax's decision: a
    multiple of every_steps, newer than the latest checkpoint)."""
    return self._manager.should_save(int(step))

  # ------------------------------------------------------------------ saving
  def _free_space(self) -> tuple[int, int] | None:
    """(free, total) bytes of the checkpoint directory's filesystem; None if remote."""
    local = _local_path(self._directory)
    if local is None:
      return None
    usage = shutil.disk_usage(local)
    return usage.free, usage.total

  def _space_line(self) -> str:
    space = self._free_space()
    if space is None:
      return ""
    return f" {self._directory} has {_mib(space[0])} free of {_mib(space[1])} (shutil.disk_usage)."

  def _kept_and_fix(self) -> str:
    steps = [s for s in self.all_steps() if s != self._pending]
    if steps:
      kept = f"the checkpoints already saved ({steps}) are intact"
      resume = f"resume from step {steps[-1]}"
    else:
      kept = "no checkpoint had been saved yet"
      resume = "start again"
    return (
      f" Nothing already saved was changed: {kept}. Free space (or choose a --workdir on "
      f"a larger disk), then rerun the same command to {resume}."
    )

  def _save_failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    return CheckpointSaveError(
      f"Saving the checkpoint for step {step} to {self._directory} failed: {_reason(e)}."
      + self._space_line()
      + self._kept_and_fix()
    )

  def check_save(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last asynchronous save failed. Without `wait`
    it only looks (no blocking, no device access): call it every step, so a failed
    write stops the run at the next step under the step that failed."""
    if self._pending is None:
      return
    if not wait and self._manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      # The write is done (or `wait`): this returns at once, raising what it raised.
      self._manager.wait_until_finished()
    except Exception as e:
      self._pending = step
      raise self._save_failed(step, e) from None

  def check_space(self, state, step: int | None = None) -> None:
    """CheckpointSaveError unless the directory's filesystem has room for a checkpoint
    of `state` (arrays or ShapeDtypeStructs): before a save (`step`), or at the start
    of a run (None) so a disk that cannot hold one checkpoint stops it before training.
    Remote paths (gs://) are not checked."""
    space = self._free_space()
    need = _state_bytes(state) + _SAVE_OVERHEAD_BYTES
    ok = space is None or space[0] >= need
    if not _all_hosts(ok):
      self._failed = True
      where = self._space_line() if space is not None else " Another host is short of space."
      what = f"Not saving step {step}" if step is not None else "Not starting"
      raise CheckpointSaveError(
        f"{what}: a checkpoint of this run in {self._directory} needs about "
        f"{_mib(need)}.{where}" + self._kept_and_fix()
      )

  def save(
    self,
    step: int,
    state,
    extra_save_args: Mapping[str, Any] | None = None,
    force: bool = False,
    extra_states: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state`, the config, the record (tokenizer, checksums) and the extra items
    at `step` if Orbax's interval says so, or always with `force`; a step that already
    has a checkpoint is never overwritten. Returns whether a save was started
    (asynchronous with async_save).

    `extra_states` ({item name: JSON-able state}, e.g. the data iterator's `get_state()`)
    gives the content of extra items as saved, so their checksums go into the record
    too and `restore(..., verify_extra=...)` can check them.

    Raises CheckpointSaveError when the previous asynchronous save failed, or when the
    directory's filesystem has less free space than the state needs (checked before
    anything is written)."""
    step = int(step)
    if self._read_only:
      raise CheckpointError(f"{self._directory} was opened read-only; not saving step {step}.")
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving.", step)
      return False
    if not (force or self._manager.should_save(step)):
      return False
    self.check_save(wait=True)  # Orbax would wait for it too before starting this one
    self.check_space(state, step)
    record = {
      "tokenizer": self._tokenizer,
      "checksum_format": integrity.FORMAT,
      "checksums": integrity.checksums(state),
      "item_checksums": {
        name: integrity.json_checksum(value) for name, value in (extra_states or {}).items()
      },
    }
    items = {
      STATE_ITEM: ocp.args.StandardSave(state),
      CONFIG_ITEM: ocp.args.JsonSave(self._config),
      RECORD_ITEM: ocp.args.JsonSave(record),
    }
    for name, args in (extra_save_args or {}).items():
      if name in _RESERVED_ITEMS:
        raise ValueError(f"Extra checkpoint item name {name!r} is reserved.")
      items[name] = args
    try:
      started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    except Exception as e:
      raise self._save_failed(step, e) from None
    if started:
      self._pending = step
    return started

  # --------------------------------------------------------------- restoring
  def _restore_json(self, step: int, item: str) -> dict | None:
    if not (self._step_dir(step) / item).exists():
      return None
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    except Exception as e:
      raise self._restore_error(step, e) from e
    return out[item]

  def restore_config(self, step: int) -> dict | None:
    """The config dict saved with `step`, or None if that step has none."""
    return self._restore_json(step, CONFIG_ITEM)

  def _saved_items(self, step: int) -> set[str]:
    """The items Orbax recorded as saved in `step` (its step metadata)."""
    with _quiet_absl():
      try:
        handlers = self._manager.metadata(step).item_handlers or {}
      except Exception:  # no or unreadable step metadata: nothing is known
        return set()
    return set(handlers)

  def restore_record(self, step: int, required: bool = False) -> dict | None:
    """The record saved with `step` (tokenizer, checksums), or None for a checkpoint saved
    before records existed. With `required`, a record that Orbax's step metadata lists
    but whose files are gone is CorruptCheckpointError (its checks cannot be made)."""
    record = self._restore_json(step, RECORD_ITEM)
    if record is None and required and RECORD_ITEM in self._saved_items(step):
      raise CorruptCheckpointError(
        f"The checkpoint {self._step_dir(step)} is damaged: its {RECORD_ITEM!r} item (the "
        "tokenizer's identity and the checksums of everything saved) was saved but is "
        f"missing, so it cannot be verified. {self._way_out(step)}"
      )
    return record

  def _way_out(self, step: int) -> str:
    others = [s for s in self.all_steps() if s < step]
    if others:
      return (
        f"Move it aside (mv {self._step_dir(step)} {self._step_dir(step)}.bad) and rerun "
        f"the same command to resume from step {others[-1]}, the previous checkpoint."
      )
    return (
      f"It is the only checkpoint: move it aside (mv {self._step_dir(step)} ...) to start again."
    )

  def restore(
    self,
    step: int,
    abstract_state,
    extra_restore_args: Mapping[str, Any] | None = None,
    verify_extra: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    """Restores `step` as `{'state': ..., <extra names>: ...}` and verifies the state
    (and the extra items named in `verify_extra`) against the checksums recorded when it
    was saved.

    Args:
      step: a step in `all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings where the state
        is sharded) giving the structure, dtypes and placement of the result.
      extra_restore_args: `{name: orbax restore args}` for extra items.
      verify_extra: `{name: () -> state}`: after the restore, the content of an extra
        item as restored (e.g. the data iterator's `get_state()`), checked against the
        checksum `save(..., extra_states=...)` recorded.

    Raises:
      CheckpointError: an unknown step, or one that cannot be read.
      CorruptCheckpointError: the restored arrays differ from what was saved.
    """
    step = int(step)
    available = self.all_steps()
    if step not in available:
      raise CheckpointError(
        f"No checkpoint for step {step} in {self._directory}; available steps: {available}."
      )
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    for name, args in (extra_restore_args or {}).items():
      if name in _RESERVED_ITEMS:
        raise ValueError(f"Extra checkpoint item name {name!r} is reserved.")
      items[name] = args
    record = self.restore_record(step, required=True)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._restore_error(step, e) from e
    out = {name: restored[name] for name in items}
    self._verify(step, out[STATE_ITEM], record)
    for name, get_state in (verify_extra or {}).items():
      self._verify_item(step, name, get_state(), record)
    return out

  def _verify_item(self, step: int, name: str, restored, record: dict | None) -> None:
    saved = ((record or {}).get("item_checksums") or {}).get(name)
    if saved is None:
      if record is not None and record.get("checksums"):
        logging.warning(
          "%s: item %r has no checksum (older version); not verified.", self._step_dir(step), name
        )
      return
    if saved != integrity.json_checksum(restored):
      raise CorruptCheckpointError(
        f"The checkpoint {self._step_dir(step)} is corrupt: its {name!r} item "
        f"({self._step_dir(step) / name}) does not match the checksum written when it was "
        "saved. "
        + (
          "Resume with --config.checkpoint.restore_data=False to keep the trained state and "
          "start the data stream afresh, or: "
          if name == "data"
          else ""
        )
        + self._way_out(step)
      )

  def check_param_shapes(self, step: int, abstract_params) -> None:
    """ValueError (one line) unless the params stored at `step` have the shapes of
    `abstract_params` (the model its config builds); a checkpoint written by another
    model shape (other code, an edited config) is named before Orbax fails on it."""
    with _quiet_absl():
      stored = ocp.StandardCheckpointer().metadata(self._step_dir(step) / STATE_ITEM)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if not isinstance(stored, Mapping) or "params" not in stored:
      return  # not a train state: leave the verdict to restore
    have = dict(jax.tree_util.tree_leaves_with_path(stored["params"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
      shape = tuple(have[path].shape) if path in have else None
      if shape != tuple(leaf.shape):
        raise ValueError(
          f"the checkpoint {self._step_dir(step)} holds params of another model shape than "
          f"its config describes (params{jax.tree_util.keystr(path)}: stored {shape}, the "
          f"config gives {tuple(leaf.shape)}); use the config it was trained with, or a "
          "workdir whose checkpoints match their saved config"
        )

  def _verify(self, step: int, state, record: dict | None) -> None:
    saved = (record or {}).get("checksums")
    if not saved:
      logging.warning(
        "%s has no checksums (saved by an older version); not verified.", self._step_dir(step)
      )
      return
    if record.get("checksum_format") != integrity.FORMAT:
      logging.warning("%s: unknown checksum format; not verified.", self._step_dir(step))
      return
    bad = integrity.mismatches(saved, integrity.checksums(state))
    if bad:
      others = [s for s in self.all_steps() if s < step]
      then = (
        f"rerun the same command to resume from step {others[-1]}, the previous checkpoint"
        if others
        else "start again (it is the only checkpoint)"
      )
      shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
      raise CorruptCheckpointError(
        f"The checkpoint {self._step_dir(step)} is corrupt: {len(bad)} of its arrays "
        f"({shown}) do not match the checksums written when it was saved. Delete it "
        f"(rm -r {self._step_dir(step)}) and {then}."
      )

  def _restore_error(self, step: int, e: Exception) -> CheckpointError:
    # A failed read is not proof of damage (a changed state structure or pipeline fails
    # the same way), so nothing here advises deleting it.
    others = [s for s in self.all_steps() if s < step]
    aside = (
      f"; if this run's code and config are those that saved it, the files may be "
      f"damaged: move it aside (mv {self._step_dir(step)} {self._step_dir(step)}.bad) to "
      f"resume from step {others[-1]}"
      if others
      else ""
    )
    return CheckpointError(
      f"Could not restore the checkpoint {self._step_dir(step)}: {_reason(e)}. It does not "
      "match what this run expects (another state structure or data pipeline), or its "
      f"files are incomplete{aside}. Nothing was deleted or overwritten."
    )

  def wait_until_finished(self) -> None:
    """Blocks until the last save is written; CheckpointSaveError if it failed."""
    self.check_save(wait=True)
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and closes; after a reported save failure it only
    closes (the failure was raised already). A second call does nothing."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    try:
      if not self._failed:
        self.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failed:
          raise
      finally:
        logging.getLogger("absl").removeFilter(self._log_filter)
        if not self._failed:
          for message in self._log_filter.held:
            logging.warning("Orbax reported: %s", message)


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns (absl) that a read-only manager is read-only; expected here."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def read_saved_config(workdir, step: int | None = None) -> tuple[dict, int]:
  """(config dict, step) saved with `step` (default: the latest) in `<workdir>/checkpoints`,
  read without creating or changing anything. ValueError when there is none."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    raise ValueError(
      f"no checkpoints in {workdir} ({directory} does not exist); check --workdir, or "
      "train first with --mode=train"
    )
  with _quiet_absl():
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(directory, options=options)
  with manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ValueError(f"no checkpoints in {directory}; train first with --mode=train")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {directory}; available: {steps}")
    if not (directory / str(step) / CONFIG_ITEM).exists():
      raise ValueError(f"the checkpoint {directory / str(step)} has no saved config; pass --config")
    try:
      out = manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(
        f"could not read the config saved in {directory / str(step)}: {type(e).__name__}: {e}"
      ) from e
  return out[CONFIG_ITEM], step
