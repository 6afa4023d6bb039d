"""Shared pytest setup: CPU only, float32 matmuls on CPU so numeric comparisons are tight.

JAX_PLATFORMS=cpu keeps an installed libtpu (CI installs it to compile for TPU topologies
ahead of time) from probing for TPU chips; topology compilation does not need the backend.
"""

import os

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
