"""`Checkpointer`: an Orbax CheckpointManager over `<workdir>/checkpoints`.

Orbax applies the save interval and a multi-host preemption's sync step (its save
policy), keeps the newest `checkpoint.keep` steps, writes asynchronously and keeps the
record (`record.py`) as per-step custom metadata. This class adds what Orbax lacks:
the record's checks on restore (checksums of the arrays and of the data position,
`integrity`), the model-shape and tokenizer guard (`guard`), a free-space check before
each save, a failed asynchronous save stopping the run at the next step, a read-only
mode for readers beside a live run, and one-line errors naming the way out
(`messages`). The saved config and record of a step are read once per Checkpointer.
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

from flt_jax.train.checkpoint import guard, integrity, messages
from flt_jax.train.checkpoint import record as record_lib
from flt_jax.train.checkpoint.messages import (
  CheckpointError,
  CheckpointSaveError,
  CorruptCheckpointError,
)

STATE_ITEM = "state"
CONFIG_ITEM = "config"
_RESERVED_ITEMS = (STATE_ITEM, CONFIG_ITEM, record_lib.LEGACY_ITEM)
# Besides the arrays' own bytes a checkpoint holds small metadata and JSON items.
_SAVE_OVERHEAD_BYTES = 1 << 20


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


@contextlib.contextmanager
def _quiet_absl():
  """Orbax's expected warnings (a read-only manager, metadata of items it has no handler
  for) stay out of the user's output."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def ensure_writable_dir(path) -> epath.Path:
  """Creates `path` and writes/deletes a probe file; clear error if it fails."""
  path = epath.Path(path)
  probe = path / f".write_probe.{jax.process_index()}.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # OSError locally, various for remote filesystems.
    raise ValueError(messages.cannot_write(path, e)) from e
  return path


def _state_bytes(state) -> int:
  def nbytes(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return int(leaf.nbytes) if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes

  return sum(nbytes(leaf) for leaf in jax.tree.leaves(state))


def _failed_hosts(failed: bool) -> list[int]:
  """The hosts whose flag is set (collective on several hosts)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  flags = multihost_utils.process_allgather(np.asarray(failed, np.int32))
  return [i for i, f in enumerate(np.asarray(flags).reshape(-1)) if f]


def _with_extra(items: dict, extra: Mapping[str, Any] | None) -> dict:
  """`items` and the caller's extra items, none of which may take a reserved name."""
  for name in extra or {}:
    if name in _RESERVED_ITEMS:
      raise ValueError(messages.reserved_item(name))
  return {**items, **(extra or {})}


class Checkpointer:
  """Saves and restores {state, config, extra items} (and the record) under
  `<workdir>/checkpoints`; usable as a context manager (`close` on exit).

  Args:
    workdir: run directory (local path or any etils.epath URL such as gs://...).
    config: the run's config (ConfigDict or dict), saved as JSON with every checkpoint;
      required to save. When given, the latest checkpoint must have been saved by a
      model of the same shape and, with `tokenizer`, the same tokenizer (`check_run`).
    every_steps: Orbax saves at multiples of this (`save` without `force`).
    keep: number of checkpoints to keep (0 keeps all).
    async_save: write in a background thread (`wait_until_finished` joins it).
    tokenizer: the tokenizer's identity (`Tokenizer.identity()`), recorded with every
      checkpoint. None: neither recorded nor checked.
    read_only: for readers (eval, sample, export) beside a possibly live run: nothing is
      created, written, deleted or cleaned up (Orbax's read_only manager), and `save`
      is refused. Only the run holding the workdir lock opens it writable: a writable
      manager removes unfinished saves, which would delete a live run's in-flight save.
  """

  def __init__(
    self,
    workdir,
    *,
    config=None,
    every_steps: int = 1,
    keep: int = 0,
    async_save: bool = False,
    tokenizer: Mapping[str, Any] | None = None,
    read_only: bool = False,
  ):
    self._read_only = bool(read_only)
    directory = epath.Path(workdir) / "checkpoints"
    if self._read_only and not directory.is_dir():
      raise ValueError(messages.no_directory(workdir, directory))
    if not self._read_only:
      if config is None:
        raise ValueError(messages.config_needed())
      directory = ensure_writable_dir(directory)
    self._directory = directory
    self._config = guard.config_json(config) if config is not None else None
    self._tokenizer = dict(tokenizer) if tokenizer is not None else None
    self._configs: dict[int, dict | None] = {}  # step -> saved config, read once
    self._records: dict[int, dict | None] = {}  # step -> record, read once
    self._pending: int | None = None  # step of an asynchronous save not yet confirmed
    self._failed = False
    self._closed = False
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
        # The interval, and the step all hosts agree on after a preemption notice (JAX's
        # sync point; never on one host, where the loop forces the save on SIGTERM).
        # Not Orbax's default extra save at the first step of a fresh run.
        save_decision_policy=checkpoint_managers.AnySavePolicy(
          [
            checkpoint_managers.FixedIntervalPolicy(int(every_steps)),
            checkpoint_managers.PreemptionCheckpointingPolicy(),
          ]
        ),
      )
    self._log_filter = _HeldOrbaxErrors()
    logging.getLogger("absl").addFilter(self._log_filter)
    with _quiet_absl() if self._read_only else contextlib.nullcontext():
      self._manager = ocp.CheckpointManager(self._directory, options=options)
    latest = self.latest_step()
    if latest is not None and config is not None:
      try:
        self.check_run(latest, config, self._tokenizer)
      except BaseException:
        self.close()  # refused: nothing held open, Orbax's logs no longer filtered
        raise

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

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _previous(self, step: int) -> int | None:
    """The newest checkpoint before `step` (where a run steps back to), or None."""
    earlier = [s for s in self.all_steps() if s < step]
    return earlier[-1] if earlier else None

  def step_to_read(self, step: int | None = None) -> int:
    """`step`, or the latest when None; ValueError (one line) when there is none."""
    steps = self.all_steps()
    if not steps:
      raise ValueError(messages.no_steps(self._directory))
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise ValueError(messages.no_step(step, self._directory, steps))
    return step

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would write (Orbax's decision: a
    multiple of every_steps, or the preemption sync step, newer than the latest)."""
    return self._manager.should_save(int(step))

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: whether every host has reached the step at which all of them stop
    after a preemption notice (JAX's sync point). Every host must ask at every step."""
    return self._manager.reached_preemption(int(step))

  # ----------------------------------------------------------- what a step holds
  def _read_json(self, step: int, item: str) -> dict | None:
    if not (self._step_dir(step) / item).exists():
      return None
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(
        messages.restore_failed(self._step_dir(step), e, self._previous(step))
      ) from e
    return out[item]

  def saved_config(self, step: int, required: bool = False) -> dict | None:
    """The config saved with `step` (read once); None if it has none, or with `required`
    a ValueError asking for --config."""
    if step not in self._configs:
      self._configs[step] = self._read_json(step, CONFIG_ITEM)
    if self._configs[step] is None and required:
      raise ValueError(messages.no_saved_config(self._step_dir(step)))
    return self._configs[step]

  def record(self, step: int) -> dict | None:
    """The record saved with `step` (read once), or None for a checkpoint saved before
    records existed. CorruptCheckpointError when it was saved and is gone: the step's
    metadata file (which holds it) is missing, or its legacy item is."""
    if step not in self._records:
      self._records[step] = self._read_record(step)
    return self._records[step]

  def _read_record(self, step: int) -> dict | None:
    step_dir = self._step_dir(step)
    try:
      with _quiet_absl():
        metadata = ocp.metadata.get_step_metadata(step_dir)
    except Exception:  # Orbax writes it with every finished step: it went missing
      raise CorruptCheckpointError(
        messages.record_missing(step_dir, False, self._previous(step))
      ) from None
    kept = (metadata.custom_metadata or {}).get(record_lib.KEY)
    if kept is not None:
      return kept
    legacy = self._read_json(step, record_lib.LEGACY_ITEM)
    if legacy is None and record_lib.LEGACY_ITEM in (metadata.item_handlers or {}):
      raise CorruptCheckpointError(messages.record_missing(step_dir, True, self._previous(step)))
    return legacy

  def check_run(self, step: int, config, tokenizer: Mapping[str, Any] | None = None) -> None:
    """ValueError unless `step` was saved by a model of `config`'s shape and, when
    `tokenizer` is given, with that tokenizer (`guard`)."""
    saved = self.saved_config(step)
    if saved is not None:
      guard.check_compatible(saved, guard.config_json(config))
    if tokenizer is not None:
      saved_tokenizer = (self.record(step) or {}).get("tokenizer")
      guard.check_tokenizer(saved_tokenizer, tokenizer, self._step_dir(step))

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
          messages.other_param_shapes(
            self._step_dir(step), jax.tree_util.keystr(path), shape, tuple(leaf.shape)
          )
        )

  # ------------------------------------------------------------------ saving
  def _free_space(self) -> tuple[int, int] | None:
    """(free, total) bytes of the checkpoint directory's filesystem; None if remote."""
    if "://" in os.fspath(self._directory):
      return None
    usage = shutil.disk_usage(os.fspath(self._directory))
    return usage.free, usage.total

  def _kept_and_fix(self) -> str:
    return messages.kept_and_fix([s for s in self.all_steps() if s != self._pending])

  def _save_failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    space = messages.space_line(self._directory, self._free_space())
    return CheckpointSaveError(
      messages.save_failed(step, self._directory, e, space, self._kept_and_fix())
    )

  def check_save(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last asynchronous save failed. Without `wait`
    it only looks (no blocking, no device access): call it every step, so a failed
    write stops the run at the next step under the step that failed.

    (Orbax's `check_for_errors` does not serve here: once the save's finalize thread has
    taken the error, only `wait_until_finished` raises it again.)"""
    if self._pending is None:
      return
    if not wait and self._manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()  # the write is done: returns or raises at once
    except Exception as e:
      self._pending = step
      raise self._save_failed(step, e) from None

  def check_save_all_hosts(self) -> None:
    """`check_save` on several hosts: collective (every host calls it at the same step),
    so that all stop together when any host's save failed."""
    error = None
    try:
      self.check_save()
    except CheckpointSaveError as e:
      error = e
    hosts = _failed_hosts(error is not None)
    if error is not None:
      raise error
    if hosts:
      self._failed = True
      raise CheckpointSaveError(messages.failed_on_other_hosts(self._directory, hosts))

  def check_space(self, state, step: int | None = None) -> None:
    """CheckpointSaveError unless the directory's filesystem has room for a checkpoint
    of `state` (arrays or ShapeDtypeStructs): before a save (`step`), or at the start
    of a run (None) so a disk that cannot hold one checkpoint stops it before training.
    Remote paths (gs://) are not checked. Collective on several hosts."""
    space = self._free_space()
    need = _state_bytes(state) + _SAVE_OVERHEAD_BYTES
    short = space is not None and space[0] < need
    if _failed_hosts(short):
      self._failed = True
      where = messages.space_line(self._directory, space) if short else ""
      raise CheckpointSaveError(
        messages.no_room(step, self._directory, need, where, self._kept_and_fix())
      )

  def save(
    self,
    step: int,
    state,
    extra_save_args: Mapping[str, Any] | None = None,
    force: bool = False,
    extra_states: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state`, the config, the extra items and the record at `step` if Orbax's
    policy says so, or always with `force`; a step that already has a checkpoint is
    never overwritten. Returns whether a save was started (asynchronous with
    async_save).

    `extra_states` ({item name: JSON-able state}, e.g. the data iterator's `get_state()`)
    gives the content of extra items as saved, so their checksums go into the record
    too and `restore(..., verify_extra=...)` can check them.

    Raises CheckpointSaveError when the previous asynchronous save failed, or when the
    directory's filesystem has less free space than the state needs (checked before
    anything is written)."""
    step = int(step)
    if self._read_only:
      raise CheckpointError(messages.read_only(self._directory, step))
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving.", step)
      return False
    if not (force or self._manager.should_save(step)):
      return False
    self.check_save(wait=True)  # Orbax would wait for it too before starting this one
    self.check_space(state, step)
    items = _with_extra(
      {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(self._config)},
      extra_save_args,
    )
    record = record_lib.build(state, self._tokenizer, extra_states)
    try:
      started = self._manager.save(
        step,
        args=ocp.args.Composite(**items),
        force=force,
        custom_metadata={record_lib.KEY: record},
      )
    except Exception as e:
      raise self._save_failed(step, e) from None
    if started:
      self._pending = step
    return bool(started)

  # --------------------------------------------------------------- restoring
  def restore(
    self,
    step: int,
    abstract_state,
    extra_restore_args: Mapping[str, Any] | None = None,
    verify_extra: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    """Restores `step` as `{'state': ..., <extra names>: ...}` and verifies the state
    (and the extra items named in `verify_extra`) against the record saved with it.

    Args:
      step: a step in `all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings where the state
        is sharded) giving the structure, dtypes and placement of the result.
      extra_restore_args: `{name: orbax restore args}` for extra items.
      verify_extra: `{name: () -> state}`: after the restore, the content of an extra
        item as restored (e.g. the data iterator's `get_state()`), checked against the
        checksum `save(..., extra_states=...)` recorded.

    Raises:
      ValueError: an unknown step.
      CheckpointError: a step that cannot be read.
      CorruptCheckpointError: what was restored differs from what was saved.
    """
    step = self.step_to_read(int(step))
    items = _with_extra({STATE_ITEM: ocp.args.StandardRestore(abstract_state)}, extra_restore_args)
    record = self.record(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(
        messages.restore_failed(self._step_dir(step), e, self._previous(step))
      ) from e
    out = {name: restored[name] for name in items}
    self._verify_state(step, out[STATE_ITEM], record)
    for name, get_state in (verify_extra or {}).items():
      self._verify_item(step, name, get_state(), record)
    return out

  def _verify_state(self, step: int, state, record: dict | None) -> None:
    step_dir = self._step_dir(step)
    saved = (record or {}).get("checksums")
    if not saved:
      logging.warning(messages.no_checksums(step_dir))
      return
    if record.get("checksum_format") != integrity.FORMAT:
      logging.warning(messages.unknown_checksum_format(step_dir))
      return
    bad = integrity.mismatches(saved, integrity.checksums(state))
    if bad:
      raise CorruptCheckpointError(messages.corrupt_arrays(step_dir, bad, self._previous(step)))

  def _verify_item(self, step: int, name: str, restored, record: dict | None) -> None:
    step_dir = self._step_dir(step)
    saved = record_lib.item_checksum(record, name)
    if saved is None:
      if (record or {}).get("checksums"):
        logging.warning(messages.item_not_checksummed(step_dir, name))
      return
    if saved != integrity.json_checksum(restored):
      raise CorruptCheckpointError(messages.corrupt_item(step_dir, name, self._previous(step)))

  def wait_until_finished(self) -> None:
    """Blocks until the last save is written; CheckpointSaveError if it failed."""
    self.check_save(wait=True)
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and closes; after a reported save failure it only
    closes (the failure was raised already). A second call does nothing."""
    if self._closed:
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
