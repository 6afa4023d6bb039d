"""Which JAX platforms a process starts: only the CPU when no accelerator is attached.

JAX starts every PJRT plugin installed beside it. On a machine without the plugin's
accelerator the start fails, and some plugins say so at length: libtpu (installed by
requirements-tpu.txt to compile for TPU topologies ahead of time) prints a five-line
host-bounds error block, a CUDA plugin warns that it found no GPU. So when neither the
environment (JAX_PLATFORMS) nor the program (jax_platforms) has chosen, and this machine
has no TPU or GPU attached, only the CPU is started. Ahead-of-time compilation is not
affected: its compile-only clients (`jax.experimental.topologies`) need no backend. On a
TPU VM or a GPU machine nothing changes. Seen from the hardware: PCI devices (as JAX's own
TPU detection does) and the device files the drivers create.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips
GPU_PCI_VENDORS = ("0x10de", "0x1002")  # NVIDIA, AMD
PCI_DISPLAY_CLASS = "0x03"  # class code prefix of VGA / 3D controllers, i.e. GPUs
# Device files of attached accelerators: TPU (v2-v4 accel, v5+ vfio groups), NVIDIA, AMD.
TPU_DEVICE_FILES = ("accel[0-9]*", "vfio/[0-9]*")
GPU_DEVICE_FILES = ("nvidia[0-9]*", "kfd")


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def pci_devices(pci_root: str = "/sys/bus/pci/devices") -> list[tuple[str, str]]:
  """(vendor, class) of every PCI device, as hex strings ('0x10de', '0x030200')."""
  return [
    (_read(os.path.join(device, "vendor")), _read(os.path.join(device, "class")))
    for device in sorted(glob.glob(os.path.join(pci_root, "*")))
  ]


def attached_accelerators(
  pci_root: str = "/sys/bus/pci/devices", dev_root: str = "/dev"
) -> set[str]:
  """{'tpu', 'gpu'}: the kinds of accelerator this machine has attached."""
  kinds = set()
  for vendor, pci_class in pci_devices(pci_root):
    if vendor == GOOGLE_PCI_VENDOR:
      kinds.add("tpu")
    if vendor in GPU_PCI_VENDORS and pci_class.startswith(PCI_DISPLAY_CLASS):
      kinds.add("gpu")
  for kind, patterns in (("tpu", TPU_DEVICE_FILES), ("gpu", GPU_DEVICE_FILES)):
    if any(glob.glob(os.path.join(dev_root, p)) for p in patterns):
      kinds.add(kind)
  return kinds


def platforms_to_start(
  environ: Mapping[str, str] | None = None, attached: set[str] | None = None
) -> str | None:
  """'cpu' when no accelerator is attached and JAX_PLATFORMS does not choose; None to
  leave the choice to JAX (every installed platform)."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME"):
    return None
  attached = attached_accelerators() if attached is None else attached
  return None if attached else "cpu"


def start_attached_only(
  environ: Mapping[str, str] | None = None, attached: set[str] | None = None
) -> str | None:
  """Sets jax_platforms to `platforms_to_start` unless the program has already chosen;
  returns what it set (None: nothing). Call it before anything touches a JAX backend;
  afterwards the setting no longer changes which backends run."""
  platforms = platforms_to_start(environ, attached)
  if platforms is None or jax.config.jax_platforms:
    return None
  jax.config.update("jax_platforms", platforms)
  return platforms
