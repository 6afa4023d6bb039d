"""Keeps freed host memory in the process for reuse (config.mesh.cpu_reuse_memory).

XLA:CPU allocates each execution's temporary buffer afresh (one block per device and
step) and frees it afterwards. glibc serves a block that large with mmap, and always so
in the per-thread arenas XLA's threads use (their heaps are at most 64 MB), then unmaps
it on free; so every step touches fresh pages, one minor page fault and a zeroed page
per 4 KiB. The sizes and costs measured: WORKSPACE.md, "Measurements behind the
settings".

`reuse_freed_memory` asks glibc (mallopt) to give every thread the main arena, to take
large blocks from the heap instead of mmap, and never to return the heap's free top to
the system: after the first steps each step's buffers land in pages the process already
has, and the step runs with no page faults. Resident memory stays at the peak the run
has reached instead of falling between steps, which is what a training process does
anyway. It applies to threads that allocate for the first time afterwards, hence before
JAX's backends start (multihost.initialize calls it); elsewhere than on glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from absl import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: about 2 GiB of free top kept


def glibc_library():
  """This process's glibc through ctypes, or None elsewhere (macOS, musl)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None  # not glibc (musl has no mallopt tuning of this kind)
  return libc


def reuse_freed_memory() -> bool:
  """Sets glibc's allocator to keep and reuse freed memory; returns whether it could."""
  libc = glibc_library()
  if libc is None:
    logging.info("config.mesh.cpu_reuse_memory: not glibc, the allocator is left as it is")
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
  if not applied:
    logging.warning("config.mesh.cpu_reuse_memory: glibc refused a mallopt setting")
  return applied
