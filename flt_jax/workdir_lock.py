"""One run per workdir: a lock file that names its holder.

`WORKDIR/run.lock` holds JSON {host, pid, pid_start, since, argv}. A second run on the same
workdir is refused with a message naming the holder. A lock whose process is gone (the run
was killed with SIGKILL, or the machine rebooted) is stale and is taken over, so resuming
after a crash needs no manual step. Only process 0 of a multi-host run takes the lock.

Creation is atomic on local filesystems (O_EXCL). Cloud Storage has no atomic create, so
there the check is best effort (read, then write), which still catches the usual mistake of
starting a run twice.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from etils import epath

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


def _process_start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (detects a reused pid); None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive(pid: int, pid_start: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  if pid_start is not None:
    now_start = _process_start_ticks(pid)
    if now_start is not None and now_start != pid_start:
      return False  # the pid was reused by another process
  return True


def _holder_text(holder: dict) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
  return f"host {holder.get('host')} pid {holder.get('pid')} (since {since})"


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): ...` holds the workdir for this process."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.enabled = enabled
    self._held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "pid_start": _process_start_ticks(pid),
      "since": time.time(),
      "argv": sys.argv,
    }

  def _read_holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or half-written: treated as stale below

  def _is_stale(self, holder: dict) -> bool:
    if not holder or "pid" not in holder:
      return True
    if holder.get("host") != socket.gethostname():
      return False  # cannot check a process on another machine
    return not _alive(int(holder["pid"]), holder.get("pid_start"))

  def _create(self) -> bool:
    text = json.dumps(self._record())
    if str(self.path).startswith("gs://"):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _refuse(self, holder: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
      f"{self.path.parent} is in use by another run: {_holder_text(holder)}. Wait for it "
      f"to finish, stop it, or choose another --workdir; if that process is surely gone "
      f"(e.g. on another machine), delete {self.path}."
    )

  def check(self) -> None:
    """WorkdirLockedError if a live process holds the workdir; creates nothing (a look
    before expensive work, so a second run is refused at once)."""
    if not self.enabled:
      return
    holder = self._read_holder()
    if holder and not self._is_stale(holder):
      raise self._refuse(holder)

  def acquire(self) -> WorkdirLock:
    if not self.enabled:
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed by a concurrent process: try again
      if self._create():
        self._held = True
        return self
      holder = self._read_holder()
      if holder is None:
        continue
      if not self._is_stale(holder):
        raise self._refuse(holder)
      self.path.unlink(missing_ok=True)
    raise WorkdirLockedError(
      f"could not take {self.path}: it keeps reappearing; is another run starting?"
    )

  def release(self) -> None:
    if not self._held:
      return
    holder = self._read_holder()
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      self.path.unlink()
    self._held = False

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
