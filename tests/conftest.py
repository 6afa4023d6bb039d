"""Shared pytest setup. The environment set here is inherited by every process a test
starts (the main command, the two-host workers, the 8-device child run) and, under
pytest-xdist, by the workers:

- JAX_PLATFORMS=cpu keeps an installed libtpu (CI installs it to compile for TPU topologies
  ahead of time) from probing for TPU chips; topology compilation does not need the backend.
- XLA_FLAGS gains tests/helpers/xla_flags.FAST_COMPILE: cheaper code generation, the same
  semantics, about half the compile time.
- JAX's persistent compilation cache in a directory of this session (removed at its end):
  the many runs of the same tiny configs, in this process and in the processes it starts,
  compile each program once. Set JAX_COMPILATION_CACHE_DIR yourself to keep one across
  sessions.
- float32 matmuls at "highest" precision, so numeric comparisons are tight.

Shared helpers live in tests/helpers/ (test modules import from there, not from each other).
"""

import os
import shutil
import tempfile

import pytest

from tests.helpers.xla_flags import with_fast_compile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock file; tests compile in several processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))
if os.environ.get("FLT_DEVICES8") == "1":  # tests/parallel/devices8: eight CPU devices
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="flt_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  # Most of the tests' programs compile in well under JAX's default threshold of 1 s.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import importlib  # noqa: E402

# flt_jax before jax: an installed CUDA plugin stays quiet (flt_jax/quiet_start.py).
importlib.import_module("flt_jax")
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Start JAX's backends now, with the devices the environment gives (one CPU device, or
# the devices8 run's eight): a run's config.mesh.cpu_devices (the cpu preset's 2) then
# cannot change the device count for the tests that follow in this process.
jax.devices()


@pytest.fixture
def orbax_reads(monkeypatch):
  """What Orbax is asked to read from now on, in order: each restored item's name
  ('state', 'config', ...) and 'metadata' for each step metadata file read."""
  import orbax.checkpoint as ocp

  reads = []
  real_restore, real_metadata = ocp.CheckpointManager.restore, ocp.metadata.get_step_metadata

  def restore(self, step, *args, **kwargs):
    reads.extend(sorted(kwargs["args"].keys()))
    return real_restore(self, step, *args, **kwargs)

  def get_step_metadata(path):
    reads.append("metadata")
    return real_metadata(path)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  monkeypatch.setattr(ocp.metadata, "get_step_metadata", get_step_metadata)
  return reads


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A workdir trained for three steps on tests.helpers.runs.tiny_run_config (one checkpoint,
  at step 3). Tests that write into it work on a copy."""
  from flt_jax import run
  from tests.helpers.runs import tiny_run_config

  workdir = tmp_path_factory.mktemp("trained") / "run"
  c = tiny_run_config()
  c.train.steps = 3
  run.train_and_evaluate(c, str(workdir))
  return workdir


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The longest single tests (over a minute on 2 cores) start first: pytest-xdist hands out
# tests in collection order, and one of these started last would leave the other workers
# idle at the end.
_LONGEST = ("tests/parallel/test_devices8.py", "tests/parallel/test_aot.py")


def pytest_collection_modifyitems(config, items):
  items.sort(
    key=lambda item: not item.nodeid.startswith(_LONGEST)
  )  # stable: the rest keep their order
