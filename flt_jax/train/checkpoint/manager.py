"""`Checkpointer`: an Orbax CheckpointManager over `<workdir>/checkpoints`.

Orbax applies the save interval (`checkpoint.every_steps`), keeps the newest
`checkpoint.keep` steps and writes asynchronously. This wrapper adds what a run needs
around it: the run's config saved with every step and checked against the workdir's
(`guard`), the state restored onto a given abstract state (its shapes, dtypes and
shardings), extra items such as the data iterator, and errors that name the directory
and the way out. Nothing here deletes a checkpoint except Orbax's keep-N after a
successful save.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from flt_jax.train.checkpoint import guard

STATE_ITEM = "state"
CONFIG_ITEM = "config"
_RESERVED_ITEMS = (STATE_ITEM, CONFIG_ITEM)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


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
      f"Cannot write checkpoints to {path}: {type(e).__name__}: {e}. Choose a writable "
      "--workdir (check that the path is not under a file, that the permissions allow "
      "writing and the disk is not full)."
    ) from e
  return path


class Checkpointer:
  """Saves and restores {state, config, extra items} under `<workdir>/checkpoints`.

  Args:
    workdir: run directory (local path or any etils.epath URL such as gs://...).
    config: the run's config (ConfigDict or dict), saved as JSON with every checkpoint.
      If the workdir already has checkpoints, the latest one's config must describe a
      model of the same shape (`guard.check_compatible`), else ValueError.
    every_steps: Orbax saves at multiples of this (`save` without `force`).
    keep: number of checkpoints to keep (0 keeps all).
    async_save: write in a background thread (`wait_until_finished` joins it).
  """

  def __init__(self, workdir, *, config, every_steps: int, keep: int, async_save: bool):
    self._directory = ensure_writable_dir(epath.Path(workdir) / "checkpoints")
    self._config = guard.config_json(config)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep) or None,
      enable_async_checkpointing=bool(async_save),
      create=True,
      # The interval alone: not Orbax's default extra save at the first step of a fresh
      # run; preemption saves are forced by the loop (PreemptionHandler).
      save_decision_policy=checkpoint_managers.FixedIntervalPolicy(int(every_steps)),
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    latest = self.latest_step()
    if latest is not None:
      saved = self.restore_config(latest)
      if saved is not None:
        guard.check_compatible(saved, self._config)

  @classmethod
  def from_config(cls, workdir, config) -> Checkpointer:
    """Built from `config.checkpoint` (every_steps, keep, async_save)."""
    c = config.checkpoint
    return cls(
      workdir, config=config, every_steps=c.every_steps, keep=c.keep, async_save=c.async_save
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

  def save(
    self, step: int, state, extra_save_args: Mapping[str, Any] | None = None, force: bool = False
  ) -> bool:
    """Saves `state`, the config and the extra items at `step` if Orbax's interval says
    so, or always with `force`; a step that already has a checkpoint is never
    overwritten. Returns whether a save was started (asynchronous with async_save)."""
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving.", step)
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(self._config)}
    for name, args in (extra_save_args or {}).items():
      if name in _RESERVED_ITEMS:
        raise ValueError(f"Extra checkpoint item name {name!r} is reserved.")
      items[name] = args
    try:
      return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    except Exception as e:
      raise CheckpointError(
        f"Saving the checkpoint for step {step} to {self._step_dir(step)} failed: "
        f"{type(e).__name__}: {e}. Existing checkpoints were left untouched; check free "
        "disk space and permissions."
      ) from e

  def restore_config(self, step: int) -> dict | None:
    """The config dict saved with `step`, or None if that step has none."""
    if not (self._step_dir(step) / CONFIG_ITEM).exists():
      return None
    try:
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
      )
    except Exception as e:
      raise self._corrupt_error(step, e) from e
    return out[CONFIG_ITEM]

  def restore(
    self, step: int, abstract_state, extra_restore_args: Mapping[str, Any] | None = None
  ) -> dict[str, Any]:
    """Restores `step` as `{'state': ..., <extra names>: ...}`.

    Args:
      step: a step in `all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings where the state
        is sharded) giving the structure, dtypes and placement of the result.
      extra_restore_args: `{name: orbax restore args}` for extra items.

    Raises:
      CheckpointError: an unknown step, or one that cannot be read.
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
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._corrupt_error(step, e) from e
    return {name: restored[name] for name in items}

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

  def _corrupt_error(self, step: int, e: Exception) -> CheckpointError:
    others = [s for s in self.all_steps() if s != step]
    hint = (
      f"resume from an earlier step (available: {others})"
      if others
      else "start from scratch in a new --workdir"
    )
    return CheckpointError(
      f"Could not restore the checkpoint in {self._step_dir(step)}: {type(e).__name__}: "
      f"{e}\nIt is corrupt or incomplete (e.g. files truncated or deleted), or it does not "
      f"match the expected state structure. Delete {self._step_dir(step)} to {hint}. "
      "Nothing was deleted or overwritten."
    )

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
