"""Preemption: the train loop asks at every step whether to save the step it reached and
stop cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax


class PreemptionHandler:
  """Whether the run should stop now (`should_stop(step)`), polled at every step.

  * Single host: SIGTERM (and the other `signals`) set a flag, through a Python handler
    installed for the `with` block (the previous handlers come back on exit).
  * Multi-host: JAX's preemption notifier catches SIGTERM on each host and the hosts
    agree on a step at which all of them stop: `reached_preemption(step)` (Orbax's
    `CheckpointManager.reached_preemption`), which every host must ask at every step.
    No Python handler is installed, so that notifier keeps working. It needs JAX's
    preemption service (jax_enable_preemption_service, on by default).
  """

  def __init__(self, reached_preemption: Callable[[int], bool], signals=(signal.SIGTERM,)):
    self._reached_preemption = reached_preemption
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._flag = threading.Event()

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

  def __enter__(self) -> PreemptionHandler:
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionHandler: not in the main thread, signal handlers not installed.")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    return self._reached_preemption(int(step))
