"""Preemption: SIGTERM becomes a flag that the train loop polls between steps, so it can
save a checkpoint at the step it reached and exit cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionHandler:
  """Turns SIGTERM into a flag the train loop polls (`should_stop`).

  Use as a context manager; the previous handlers are restored on exit.

  * Single host: installs a Python handler for `signals`; `should_stop()` is the flag.
  * Multi-host (`jax.process_count() > 1`): `should_stop(step)` must be called by every
    process at every step (same step ids). It returns True at JAX's preemption sync
    point (`multihost_utils.reached_preemption_sync_point`, available after
    `jax.distributed.initialize`), whose own notifier catches SIGTERM; to keep that
    notifier working no Python handler is installed in this mode. If the sync service
    turns out to be unavailable, the Python handler is installed then and the
    processes all-gather their flags so that they all stop at the same step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._flag = threading.Event()
    self._active = False  # inside the `with` block
    self._installed = False  # Python handlers currently installed
    self._sync_unavailable = False

  def _handler(self, signum, frame):
    del frame
    if self._flag.is_set() and signum == signal.SIGINT:
      # A second Ctrl-C: leave now. A save in flight is an unfinished temporary directory,
      # which the next run's writable checkpointer removes; finished ones are untouched.
      os.write(
        2,
        b"\nsecond Ctrl-C: exiting now without waiting for the save; the checkpoints "
        b"already finished are intact\n",
      )
      os._exit(130)
    logging.warning("Received signal %d: will save a checkpoint and stop.", signum)
    if signum == signal.SIGINT:
      os.write(2, b"\nCtrl-C: saving the step reached, then stopping (Ctrl-C again to exit now)\n")
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

  def __enter__(self) -> PreemptionHandler:
    self._active = True
    if jax.process_count() == 1 or self._sync_unavailable:
      self._install_signals()
    return self

  def __exit__(self, *exc) -> None:
    self._active = False
    if not self._installed:
      return
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()
    self._installed = False

  def should_stop(self, step: int | None = None) -> bool:
    if jax.process_count() == 1 or step is None:
      return self._flag.is_set()
    if not self._sync_unavailable:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:
        self._sync_unavailable = True
        logging.warning(
          "Preemption sync service unavailable; catching SIGTERM in Python and "
          "all-gathering the flag."
        )
        if self._active:
          self._install_signals()
    flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
    return bool(np.any(flags))
