"""config.mesh.cpu_reuse_memory: freed host memory is reused, not faulted in afresh."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import pytest

from flt_jax.errors import ConfigError
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import host_memory
from flt_jax.presets import make

# A new thread (as XLA's are) allocates a block above the 64 MB heap of glibc's
# per-thread arenas, as a step's temporary buffer is, touches it, frees it; three times.
_CHILD = """
import ctypes, json, resource, sys, threading
from flt_jax.parallel import host_memory
if sys.argv[1] == "on":
  assert host_memory.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 96 << 20
faults = []
def work():
  for _ in range(3):
    block = libc.malloc(SIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, SIZE)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _touch_faults(mode: str) -> list[int]:
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.glibc_library() is None, reason="needs glibc (Linux): mallopt")
def test_freed_blocks_are_reused_without_page_faults():
  default = _touch_faults("off")
  reused = _touch_faults("on")
  # 96 MB is 24,576 pages of 4 KiB (48 of 2 MiB where transparent huge pages are on):
  # without the setting every touch faults them in again.
  assert min(default) >= 40, default
  assert reused[0] >= 40, reused  # the first touch still brings the pages in
  assert max(reused[1:]) <= 4, reused  # later ones find them in the process


def test_the_cpu_preset_reuses_memory_and_the_value_is_checked():
  assert make("FLT", 12, "cpu").mesh.cpu_reuse_memory is True
  assert make("FLT", 12, "paper").mesh.cpu_reuse_memory is False
  # ConfigDict keeps a bool a bool; a mesh section built from a dict (a saved config) may
  # not be one.
  mesh = ml_collections.ConfigDict({**parallel_config.get_config(), "cpu_reuse_memory": "yes"})
  with pytest.raises(ConfigError, match=r"config.mesh.cpu_reuse_memory='yes' is invalid"):
    parallel_config.validate(mesh)
