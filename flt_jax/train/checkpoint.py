"""Checkpointing: an Orbax CheckpointManager wrapper, config guard, SIGTERM.

Layout: ``<workdir>/checkpoints/<step>/`` holding the items

* ``state``: a pytree of arrays (params, opt_state, step, rng, ...), saved with
  ``StandardSave`` and restored with ``StandardRestore(abstract_state)`` so the
  result has the target's structure, dtypes and shardings;
* ``config``: ``config.to_dict()`` as JSON (used to refuse a mismatched
  workdir, see `check_config_compatible`);
* optional extra items given by the caller as ``{name: orbax args}`` (e.g. the
  data iterator state; its args objects come from flt_jax.data).

Errors are explicit: an unwritable workdir fails at construction; a checkpoint
that cannot be read names its step directory and the way out. Nothing here
ever deletes a checkpoint except Orbax's keep-N after a successful save.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# Model fields whose change makes a checkpoint unusable. `loops` (and
# loss_type) are deliberately absent: a checkpoint may be evaluated or
# fine-tuned at another loop count.
MODEL_SHAPE_FIELDS = (
  "vocab_size",
  "n_layer",
  "d_model",
  "n_head",
  "n_kv_head",
  "kv_lora_rank",
  "variant",
  "window_pattern",
  "seq_len",
)

STATE_ITEM = "state"
CONFIG_ITEM = "config"
_RESERVED_ITEMS = (STATE_ITEM, CONFIG_ITEM)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


# ----------------------------------------------------------------------------
# Config guard.
# ----------------------------------------------------------------------------


def _as_dict(config) -> Mapping[str, Any]:
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return config


def _normalize(v):
  """JSON round trip makes tuples lists; compare in that form."""
  if isinstance(v, (list, tuple)):
    return [_normalize(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  return v


def check_config_compatible(saved_config_dict, config_dict) -> None:
  """Raises ValueError if model-shape fields differ between saved and now.

  Compares ``model.<f>`` for f in `MODEL_SHAPE_FIELDS` (not ``loops``). A field
  missing on both sides is ignored.
  """
  saved_model = _as_dict(_as_dict(saved_config_dict).get("model", {})) or {}
  model = _as_dict(_as_dict(config_dict).get("model", {})) or {}
  missing = object()
  diffs = []
  for field in MODEL_SHAPE_FIELDS:
    a = saved_model.get(field, missing)
    b = model.get(field, missing)
    if a is missing and b is missing:
      continue
    if a is missing or b is missing or _normalize(a) != _normalize(b):
      fmt = lambda x: "<absent>" if x is missing else repr(_normalize(x))
      diffs.append(f"model.{field}: saved {fmt(a)}, now {fmt(b)}")
  if diffs:
    raise ValueError(
      "The checkpoints in this workdir were written by a model with a "
      "different shape:\n  "
      + "\n  ".join(diffs)
      + "\nUse a new --workdir for the new model, or restore the saved values "
      "(e.g. --config.model.<field>=<saved value>)."
    )


def _jsonable(obj):
  """Makes config.to_dict() JSON-safe (tuples -> lists, others -> str)."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return repr(obj)


# ----------------------------------------------------------------------------
# Workdir checks.
# ----------------------------------------------------------------------------


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
      f"Cannot write checkpoints to {path}: {type(e).__name__}: {e}. "
      f"Choose a writable --workdir (check that the path is not under a "
      f"file, that the permissions allow writing and the disk is not "
      f"full)."
    ) from e
  return path


# ----------------------------------------------------------------------------
# Checkpointer.
# ----------------------------------------------------------------------------


def _to_abstract(tree):
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray) or np.isscalar(x):
      x = np.asarray(x)
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Orbax CheckpointManager over ``<workdir>/checkpoints``.

  Args:
    workdir: run directory (local path or any epath-supported URL).
    config: the run's config (ConfigDict or dict). Saved as JSON with every
      checkpoint. If given and `check_config` is True, an existing latest
      checkpoint's config is compared with it (`check_config_compatible`).
    every_steps: ``save`` without ``force`` writes only at multiples of this.
    keep: number of checkpoints to keep (0 or None keeps all).
    async_save: write in a background thread (call `wait_until_finished`).
  """

  def __init__(
    self,
    workdir,
    *,
    config=None,
    every_steps: int = 1000,
    keep: int | None = 3,
    async_save: bool = True,
    check_config: bool = True,
  ):
    self._directory = ensure_writable_dir(epath.Path(workdir) / "checkpoints")
    self._config_dict = _jsonable(_as_dict(config)) if config is not None else None
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=int(every_steps),
      max_to_keep=int(keep) if keep else None,
      enable_async_checkpointing=bool(async_save),
      create=True,
    )
    self._every_steps = int(every_steps)
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    if self._config_dict is not None and check_config:
      latest = self.latest_step()
      if latest is not None:
        saved = self.restore_config(latest)
        if saved is not None:
          check_config_compatible(saved, self._config_dict)

  @classmethod
  def from_config(cls, workdir, config, **kwargs) -> Checkpointer:
    """Builds from ``config.checkpoint`` (every_steps, keep, async_save)."""
    c = config.checkpoint
    return cls(
      workdir,
      config=config,
      every_steps=c.every_steps,
      keep=c.keep,
      async_save=c.async_save,
      **kwargs,
    )

  # -- queries ---------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(
    self, step: int, state, extra_save_args: Mapping[str, Any] | None = None, force: bool = False
  ) -> bool:
    """Saves `state` (+ config + extra items) at `step`.

    Without `force`, only at multiples of ``every_steps``. A step that already
    has a checkpoint is never overwritten (returns False). Returns whether a
    save was started (asynchronous when ``async_save``).
    """
    step = int(step)
    if not force and step % self._every_steps != 0:
      return False
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving.", step)
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if self._config_dict is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(self._config_dict)
    for name, args in (extra_save_args or {}).items():
      if name in _RESERVED_ITEMS:
        raise ValueError(f"Extra checkpoint item name {name!r} is reserved.")
      items[name] = args
    try:
      return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    except Exception as e:
      raise CheckpointError(
        f"Saving the checkpoint for step {step} to {self.step_dir(step)} "
        f"failed: {type(e).__name__}: {e}. Existing checkpoints were left "
        f"untouched; check free disk space and permissions."
      ) from e

  # -- restore ---------------------------------------------------------------

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config dict saved with `step` (latest by default), or None."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if not (self.step_dir(step) / CONFIG_ITEM).exists():
      return None
    try:
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
      )
    except Exception as e:
      raise self._corrupt_error(step, e) from e
    return out[CONFIG_ITEM]

  saved_config = restore_config  # Alias.

  def restore(
    self,
    step: int | None = None,
    abstract_state=None,
    extra_restore_args: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    """Restores `step` (latest if None).

    Args:
      step: step to restore; None means the latest.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) or of
        arrays, giving the structure/dtypes/shardings of the result. None
        restores as saved.
      extra_restore_args: ``{name: orbax restore args}`` for extra items.

    Returns:
      ``{'state': ..., 'config': dict or None, <extra names>: ...}``.

    Raises:
      CheckpointError: no checkpoint, unknown step, or an unreadable one.
    """
    available = self.all_steps()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"No checkpoint found in {self._directory}.")
    step = int(step)
    if step not in available:
      raise CheckpointError(
        f"No checkpoint for step {step} in {self._directory}; available steps: {available}."
      )
    target = None if abstract_state is None else _to_abstract(abstract_state)
    items = {STATE_ITEM: ocp.args.StandardRestore(target)}
    has_config = (self.step_dir(step) / CONFIG_ITEM).exists()
    if has_config:
      items[CONFIG_ITEM] = ocp.args.JsonRestore()
    for name, args in (extra_restore_args or {}).items():
      if name in _RESERVED_ITEMS:
        raise ValueError(f"Extra checkpoint item name {name!r} is reserved.")
      items[name] = args
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._corrupt_error(step, e) from e
    out = {name: restored[name] for name in items}
    out.setdefault(CONFIG_ITEM, None)
    return out

  def _corrupt_error(self, step: int, e: Exception) -> CheckpointError:
    others = [s for s in self.all_steps() if s != step]
    hint = (
      f"resume from an earlier step (available: {others})"
      if others
      else "start from scratch in a new --workdir"
    )
    return CheckpointError(
      f"Could not restore the checkpoint in {self.step_dir(step)}: "
      f"{type(e).__name__}: {e}\nIt is corrupt or incomplete (e.g. files "
      f"truncated or deleted), or it does not match the expected state "
      f"structure. Delete {self.step_dir(step)} to {hint}. Nothing was "
      f"deleted or overwritten."
    )

  # -- lifecycle -------------------------------------------------------------

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------


class PreemptionHandler:
  """Turns SIGTERM into a flag the train loop polls (``should_stop``).

  Use as a context manager (or install()/uninstall()); the previous handlers
  are restored on exit.

  * Single host: installs a Python handler for `signals`; ``should_stop()``
    is the flag.
  * Multi-host (``jax.process_count() > 1``): ``should_stop(step)`` must be
    called by every process at every step (same step ids). It returns True at
    JAX's preemption sync point (``multihost_utils.
    reached_preemption_sync_point``, available after
    ``jax.distributed.initialize``), whose own notifier catches SIGTERM; to
    keep that notifier working no Python handler is installed in this mode.
    If the sync service turns out to be unavailable, the Python handler is
    installed then and the processes all-gather their flags so that they all
    stop at the same step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._flag = threading.Event()
    self._active = False  # Between install() and uninstall().
    self._installed = False  # Python handlers currently installed.
    self._sync_unavailable = False

  def _handler(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will save a checkpoint and stop.", signum)
    self._flag.set()

  def _install_signals(self) -> None:
    if self._installed:
      return
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionHandler: not in the main thread, signal handlers not installed.")
      return
    for sig in self._signals:
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handler)
    self._installed = True

  def install(self) -> PreemptionHandler:
    self._active = True
    if jax.process_count() == 1 or self._sync_unavailable:
      self._install_signals()
    return self

  def uninstall(self) -> None:
    self._active = False
    if not self._installed:
      return
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()
    self._installed = False

  def __enter__(self) -> PreemptionHandler:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def should_stop(self, step: int | None = None) -> bool:
    if jax.process_count() == 1 or step is None:
      return self._flag.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if not self._sync_unavailable:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:
        self._sync_unavailable = True
        logging.warning(
          "Preemption sync service unavailable; catching "
          "SIGTERM in Python and all-gathering the flag."
        )
        if self._active:
          self._install_signals()
    flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
    return bool(np.any(flags))
