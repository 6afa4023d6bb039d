"""Shared pytest setup: CPU only, float32 matmuls on CPU so numeric comparisons are tight.

JAX_PLATFORMS=cpu keeps an installed libtpu (CI installs it to compile for TPU topologies
ahead of time) from probing for TPU chips; topology compilation does not need the backend.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock file; tests compile in several processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import importlib  # noqa: E402

# flt_jax before jax: an installed CUDA plugin stays quiet (flt_jax/quiet_start.py).
importlib.import_module("flt_jax")
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Start JAX's backends now, with the devices the environment gives (one CPU device, or
# the devices8 child's eight): a run's config.mesh.cpu_devices (the cpu preset's 2) then
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
  """A workdir trained for three steps on tests.test_run's tiny config (one checkpoint,
  at step 3). Tests that write into it work on a copy."""
  from flt_jax import run
  from tests.test_run import tiny_config

  workdir = tmp_path_factory.mktemp("trained") / "run"
  c = tiny_config()
  c.train.steps = 3
  run.train_and_evaluate(c, str(workdir))
  return workdir
