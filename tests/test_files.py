"""flt_jax/files.py: whole files and whole lines, under SIGKILL and a full disk."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flt_jax import files

REPO = Path(__file__).resolve().parents[1]


def _run_child(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


def test_write_atomic_replaces_the_file_whole(tmp_path):
  path = tmp_path / "sub" / "table.json"
  files.write_atomic(path, "old")
  files.write_atomic(path, b"new bytes")
  assert path.read_bytes() == b"new bytes"
  assert sorted(p.name for p in path.parent.iterdir()) == ["table.json"]  # no temporaries


def test_a_writer_killed_mid_write_leaves_the_previous_version(tmp_path):
  path = tmp_path / "table.json"
  path.write_text('{"old": 1}')
  # The child dies (SIGKILL) after writing the new bytes, before they are in place.
  child = _run_child(
    "import os, signal\n"
    "from flt_jax import files\n"
    "files.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
    f"files.write_atomic({str(path)!r}, '{{\"new\": 2}}' * 1000)\n"
  )
  assert child.returncode == -9, child.stderr
  assert json.loads(path.read_text()) == {"old": 1}


def test_a_full_disk_is_one_line_and_keeps_the_previous_version(tmp_path, monkeypatch):
  path = tmp_path / "model.npz"
  path.write_bytes(b"previous")

  def full(fd, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(files.os, "write", full)
  with pytest.raises(files.FileWriteError) as e:
    files.write_atomic(path, b"x" * 100)
  msg = str(e.value)
  assert "No space left on device" in msg and str(path) in msg and "\n" not in msg
  assert "the previous file is unchanged" in msg and "free space" in msg
  assert path.read_bytes() == b"previous"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_bad_targets_are_named_before_any_work(tmp_path):
  (tmp_path / "a_dir").mkdir()
  (tmp_path / "a_file").write_text("x")
  cases = {
    tmp_path / "a_dir": "name a file, not a directory",
    tmp_path / "a_file" / "x.npz": "a part of the path is a file",
  }
  for path, fix in cases.items():
    with pytest.raises(files.FileWriteError, match=fix):
      files.check_writable_file(path)
    with pytest.raises(files.FileWriteError, match=fix):
      files.write_atomic(path, b"data")


def test_an_unwritable_directory_is_named_before_any_work(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  try:
    if os.access(locked, os.W_OK):  # root ignores the mode bits
      pytest.skip("running as a user that can write to a read-only directory (root)")
    with pytest.raises(files.FileWriteError, match="Permission denied|permission denied"):
      files.check_writable_file(locked / "x.npz")
  finally:
    locked.chmod(0o755)


def test_jsonl_lines_are_whole_after_a_kill_mid_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  appender = files.JsonlAppender(path)
  appender.append({"step": 1, "loss": 2.5})
  appender.close()
  # The child writes half of its line, then dies.
  child = _run_child(
    "import os, signal\n"
    "from flt_jax import files\n"
    "real = os.write\n"
    "def half(fd, data):\n"
    "  real(fd, data[: len(data) // 2])\n"
    "  os.kill(os.getpid(), signal.SIGKILL)\n"
    f"a = files.JsonlAppender({str(path)!r})\n"
    "files.os.write = half\n"
    "a.append({'step': 2, 'loss': 2.25})\n"
  )
  assert child.returncode == -9, child.stderr
  assert not path.read_text().endswith("\n")  # the partial line is there...
  appender = files.JsonlAppender(path)  # ...and cut off by the next opener
  appender.append({"step": 2, "loss": 2.0})
  appender.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
    {"step": 1, "loss": 2.5},
    {"step": 2, "loss": 2.0},
  ]


def test_a_jsonl_line_that_does_not_fit_is_cut_back_off(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  appender = files.JsonlAppender(path)
  appender.append({"step": 1})
  real = os.write

  def short(fd, data):
    return real(fd, data[:5])  # the disk filled after 5 bytes

  monkeypatch.setattr(files.os, "write", short)
  with pytest.raises(files.FileWriteError, match="lines before it are intact"):
    appender.append({"step": 2, "loss": 1.0})
  monkeypatch.setattr(files.os, "write", real)
  appender.append({"step": 3})
  appender.close()
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 3]
