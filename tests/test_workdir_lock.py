"""One run per workdir: a live holder is refused by name, a dead one is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from flt_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError


def _write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "since": 0}
  record.update(fields)
  (workdir / LOCK_NAME).write_text(json.dumps(record))


def test_acquire_writes_holder_and_release_removes_it(tmp_path):
  with WorkdirLock(tmp_path):
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  assert not (tmp_path / LOCK_NAME).exists()


def test_live_holder_in_another_process_is_refused_by_host_and_pid(tmp_path):
  code = (
    "import sys, time; from flt_jax.workdir_lock import WorkdirLock\n"
    f"with WorkdirLock({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)\n"
  )
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLockedError) as e:
      WorkdirLock(tmp_path).acquire()
    assert f"pid {proc.pid}" in str(e.value) and socket.gethostname() in str(e.value)
  finally:
    proc.kill()
    proc.wait()
  # The holder died without releasing (SIGKILL): the lock is stale and a resume takes it.
  with WorkdirLock(tmp_path):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_dead_pid_is_stale(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid)
  with WorkdirLock(tmp_path):
    pass


def test_reused_pid_is_stale(tmp_path):
  # Our own pid with another start time: a new process that happens to reuse the pid.
  _write_lock(tmp_path, pid=os.getpid(), pid_start=1)
  with WorkdirLock(tmp_path):
    pass


def test_live_pid_with_matching_start_is_refused(tmp_path):
  from flt_jax.workdir_lock import _process_start_ticks

  _write_lock(tmp_path, pid=os.getppid(), pid_start=_process_start_ticks(os.getppid()))
  with pytest.raises(WorkdirLockedError, match="in use by another run"):
    WorkdirLock(tmp_path).acquire()


def test_holder_on_another_host_is_not_taken_over(tmp_path):
  _write_lock(tmp_path, host="some-other-host", pid=1, since=time.time())
  with pytest.raises(WorkdirLockedError, match="some-other-host"):
    WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "some-other-host"


def test_release_leaves_a_lock_taken_over_by_someone_else(tmp_path):
  lock = WorkdirLock(tmp_path).acquire()
  _write_lock(tmp_path, host="some-other-host", pid=1)
  lock.release()
  assert (tmp_path / LOCK_NAME).exists()
