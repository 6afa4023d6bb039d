"""Files written whole: a reader, a crash or a full disk leaves the previous version or the
new one, never a part.

  write_atomic(path, data)   a whole file (JSON, CSV, PNG, .npz, config.txt): written to a
                             temporary sibling, flushed to disk, then renamed over `path`
                             (os.replace is atomic on POSIX filesystems)
  JsonlAppender(path)        one JSON record per line, each line appended whole: a write
                             that fails is cut back off the file, and a partial last line
                             left by a killed process is cut off when the file is reopened

Local paths only get these guarantees; a remote path (gs://...) is written through
etils.epath, whose object stores replace an object whole on upload.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any

from etils import epath


class FileWriteError(OSError):
  """A file could not be written; the message names it, the cause and what is left."""


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def _reason(e: OSError) -> str:
  if e.errno:
    return f"[Errno {e.errno}] {os.strerror(e.errno)}"
  return f"{type(e).__name__}: {e}"


def write_error(path, e: OSError, previous: str) -> FileWriteError:
  """The one-line error for a failed write of `path`; `previous` says what is left."""
  fix = (
    "free space, or choose another path" if e.errno == errno.ENOSPC else "choose a writable path"
  )
  if e.errno == errno.EISDIR:
    fix = "name a file, not a directory"
  elif e.errno == errno.ENOTDIR:
    fix = "a part of the path is a file, not a directory: choose another path"
  error = FileWriteError(f"could not write {path}: {_reason(e)}; {previous}. Fix: {fix}")
  error.errno = e.errno
  return error


def _make_parent(path: str) -> None:
  """Creates the parent directory of `path`; NotADirectoryError if a part is a file."""
  parent = os.path.dirname(os.path.abspath(path))
  probe = parent
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if probe and not os.path.isdir(probe):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
  os.makedirs(parent, exist_ok=True)


def check_writable_file(path) -> None:
  """FileWriteError now, before any work, if `path` cannot become a file: it is a
  directory, a part of its parent is a file, or the parent cannot be created or written."""
  if not is_local(path):
    return
  path = os.fspath(path)
  if os.path.isdir(path):
    raise write_error(path, IsADirectoryError(errno.EISDIR, "is a directory"), "nothing written")
  try:
    _make_parent(path)
  except OSError as e:
    raise write_error(path, e, "nothing written") from None
  if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
    raise write_error(path, PermissionError(errno.EACCES, "permission denied"), "nothing written")


def write_atomic(path, data: bytes | str) -> epath.Path:
  """Writes `data` (str as UTF-8) to `path` as a whole; creates the parent directory.
  FileWriteError (one line) if it fails, with the previous file unchanged."""
  raw = data.encode() if isinstance(data, str) else bytes(data)
  path = epath.Path(path)
  if not is_local(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path
  target = os.fspath(path)
  kept = "the previous file is unchanged" if os.path.exists(target) else "nothing written"
  tmp = os.path.join(
    os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.{os.getpid()}.tmp"
  )
  try:
    if os.path.isdir(target):
      raise IsADirectoryError(errno.EISDIR, "is a directory")
    _make_parent(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      view = memoryview(raw)
      while view:
        view = view[os.write(fd, view) :]
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, target)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise write_error(target, e, kept) from None
  return path


class JsonlAppender:
  """Appends one JSON object per line to `path`, each line whole (local paths).

  On open, a partial last line (left by a process killed mid-write) is cut off, so a
  resumed run never appends onto it. A write that fails (a full disk) is cut back off
  the file and raised as FileWriteError; the caller decides whether to go on.
  """

  def __init__(self, path):
    self.path = epath.Path(path)
    self._fd: int | None = None
    self._remote = None
    if not is_local(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._remote = self.path.open("a")
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    self._cut_partial_line()

  def _cut_partial_line(self) -> None:
    size = os.fstat(self._fd).st_size
    if not size:
      return
    tail_start = max(0, size - 65536)
    while True:
      tail = os.pread(self._fd, size - tail_start, tail_start)
      if tail.endswith(b"\n"):
        return
      cut = tail.rfind(b"\n")
      if cut >= 0 or tail_start == 0:
        os.ftruncate(self._fd, tail_start + cut + 1)
        return
      tail_start = max(0, tail_start - 65536)

  def append(self, record: dict[str, Any]) -> None:
    line = (json.dumps(record) + "\n").encode()
    if self._remote is not None:
      self._remote.write(line.decode())
      self._remote.flush()
      return
    size = os.fstat(self._fd).st_size
    try:
      written = os.write(self._fd, line)
      if written != len(line):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, size)
      raise write_error(self.path, e, "the lines before it are intact") from None

  def close(self) -> None:
    if self._remote is not None:
      self._remote.close()
      self._remote = None
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
