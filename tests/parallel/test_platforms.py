"""Only the CPU starts on a machine without accelerators, so an installed libtpu or CUDA
plugin says nothing there; an attached accelerator, or a choice already made, is left
alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flt_jax.parallel import multihost, platforms

REPO = Path(__file__).resolve().parents[2]


def _pci(root: Path, name: str, vendor: str, pci_class: str) -> None:
  device = root / name
  device.mkdir(parents=True)
  (device / "vendor").write_text(vendor + "\n")
  (device / "class").write_text(pci_class + "\n")


def test_attached_accelerators_from_pci_devices(tmp_path):
  pci, dev = tmp_path / "pci", tmp_path / "dev"
  dev.mkdir()
  _pci(pci, "0000:00:01.0", "0x8086", "0x060000")  # a host bridge
  _pci(pci, "0000:00:02.0", "0x10de", "0x020000")  # an NVIDIA network card: no GPU
  assert platforms.attached_accelerators(str(pci), str(dev)) == set()
  _pci(pci, "0000:00:03.0", "0x10de", "0x030200")  # an NVIDIA 3D controller
  assert platforms.attached_accelerators(str(pci), str(dev)) == {"gpu"}
  _pci(pci, "0000:00:04.0", "0x1ae0", "0x120000")  # a TPU chip
  assert platforms.attached_accelerators(str(pci), str(dev)) == {"gpu", "tpu"}
  assert multihost.has_tpu_chips(str(pci))


@pytest.mark.parametrize(
  "files, kinds", [(["nvidia0"], {"gpu"}), (["kfd"], {"gpu"}), (["accel0"], {"tpu"}), ([], set())]
)
def test_attached_accelerators_from_device_files(tmp_path, files, kinds):
  (tmp_path / "pci").mkdir()
  for name in [*files, "nvidiactl", "null"]:  # nvidiactl alone is no GPU
    (tmp_path / name).touch()
  assert platforms.attached_accelerators(str(tmp_path / "pci"), str(tmp_path)) == kinds


@pytest.mark.parametrize(
  "environ, attached, expected",
  [
    ({}, set(), "cpu"),
    ({}, {"tpu"}, None),
    ({}, {"gpu"}, None),
    ({"JAX_PLATFORMS": "tpu"}, set(), None),
    ({"JAX_PLATFORM_NAME": "cpu"}, set(), None),
  ],
)
def test_platforms_to_start(environ, attached, expected):
  assert platforms.platforms_to_start(environ, attached) == expected


def test_a_cpu_process_starts_quietly_with_libtpu_installed():
  # A fresh interpreter without JAX_PLATFORMS (the tests set it): with libtpu installed,
  # starting every platform prints its host-bounds error block.
  code = (
    "from flt_jax.parallel import platforms\n"
    "assert platforms.start_attached_only(environ={}, attached=set()) == 'cpu'\n"
    "import jax\n"
    "assert jax.config.jax_platforms == 'cpu' and jax.devices()[0].platform == 'cpu'\n"
    "assert platforms.start_attached_only(environ={}, attached=set()) is None\n"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  # libtpu's block when it starts off a TPU VM ("Failed to find host bounds ...",
  # "... TPU_WORKER_HOSTNAMES ..."); an installed CUDA plugin's libraries log while jax
  # is imported, before any platform is chosen, which is not this module's to prevent.
  assert "host bounds" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
