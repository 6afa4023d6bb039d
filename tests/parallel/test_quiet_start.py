"""flt_jax.quiet_start: with libtpu or the CUDA plugin installed on a machine without the
hardware, a command starts JAX on the CPU without the plugins' noise; anything else on
stderr is kept."""

import os
import pathlib
import subprocess
import sys

import pytest

from flt_jax import quiet_start

REPO = pathlib.Path(__file__).resolve().parents[2]

NOISE = (
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
  "I0000 00:00:1796206945.084948   10243 cudart_stub.cc:31] Could not find cuda drivers on "
  "your machine, GPU will not be used.WARNING: All log messages before absl::InitializeLog() "
  "is called are written to STDERR\n"
  "I0000 00:00:1796206945.086550   10244 cudart_stub.cc:31] Could not find cuda drivers on "
  "your machine, GPU will not be used.\n"
)


def test_only_the_plugins_driver_lines_are_dropped():
  kept = "E0000 something real failed\nTraceback (most recent call last):\n"
  assert quiet_start.without_noise(NOISE) == ""
  lines = NOISE.splitlines(keepends=True)
  assert quiet_start.without_noise("".join(lines[:1] + [kept] + lines[1:])) == kept


@pytest.mark.parametrize(
  "cuda, gpu, libtpu, tpu, cpu_only",
  [
    (False, False, False, False, False),  # no plugin: JAX's defaults, nothing to quieten
    (True, False, False, False, True),  # CUDA plugin, no driver
    (False, False, True, False, True),  # libtpu, no TPU chip
    (True, False, True, False, True),
    (True, True, True, False, False),  # a GPU machine starts CUDA
    (True, False, True, True, False),  # a TPU VM starts the TPU
  ],
)
def test_the_cpu_backend_alone_only_where_no_installed_plugin_has_hardware(
  cuda, gpu, libtpu, tpu, cpu_only
):
  got = quiet_start.cpu_only(cuda_installed=cuda, gpu=gpu, libtpu_installed=libtpu, tpu=tpu)
  assert got == cpu_only


@pytest.mark.skipif(
  quiet_start.nvidia_driver_present() or quiet_start.tpu_present(),
  reason="this machine has an accelerator: JAX starts it (and may say so)",
)
def test_a_cpu_command_prints_nothing_but_its_output():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import flt_jax.errors, jax; print(jax.devices())"
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[CpuDevice(id=0)]"
  assert proc.stderr == "", proc.stderr[-3000:]  # libtpu's or the CUDA plugin's noise
