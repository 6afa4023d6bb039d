"""Quiet starts on machines without the accelerators whose JAX plugins are installed.

CI and `python -m flt_jax.aot` install libtpu and the CUDA plugin to compile for TPUs
and GPUs; so may a laptop. Without the hardware, every command would then print noise:
the CUDA plugin's libraries log "Could not find cuda drivers" three times while jax is
imported, the plugin's initialisation prints a traceback when the backends start, and
libtpu prints a five-line host-bounds error block. `start()` (run when flt_jax is first
imported, before jax) imports jax with those known lines filtered out of stderr
(anything else written there is kept), and, unless JAX_PLATFORMS is set, starts only the
CPU backend when neither a GPU driver nor a TPU chip is on the machine, which is what
JAX would have fallen back to after the noise.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import sys
import tempfile

# Lines the CUDA plugin's libraries log at import when the machine has no NVIDIA driver.
_CUDA_IMPORT_NOISE = re.compile(
  r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
  r"STDERR$|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
)
# Google's PCI vendor id: TPU chips on the PCI bus (what libtpu drives).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def cuda_plugin_installed() -> bool:
  return _installed("jax_plugins.xla_cuda12") or _installed("jax_cuda12_plugin")


def nvidia_driver_present() -> bool:
  """An NVIDIA kernel driver or its device nodes: CUDA can start here."""
  return os.path.exists("/proc/driver/nvidia") or bool(glob.glob("/dev/nvidia[0-9]*"))


def tpu_present() -> bool:
  """TPU chips on the PCI bus, their device nodes, or a Cloud TPU VM's environment."""
  # v4 chips appear as /dev/accel*, v5e and later through VFIO; a VFIO device that is no
  # TPU only keeps JAX's default start (the safe side).
  if os.environ.get("TPU_ACCELERATOR_TYPE") or glob.glob("/dev/accel[0-9]*"):
    return True
  if glob.glob("/dev/vfio/[0-9]*"):
    return True
  return google_pci_device()


def google_pci_device(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """A PCI device of Google's vendor id: the TPU chips of a Cloud TPU VM."""
  for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def cpu_only(*, cuda_installed: bool, gpu: bool, libtpu_installed: bool, tpu: bool) -> bool:
  """Start only the CPU backend: an accelerator plugin is installed but none of the
  hardware the installed plugins drive is present (the plugins would fail, noisily)."""
  return (
    (cuda_installed or libtpu_installed)
    and not (cuda_installed and gpu)
    and not (libtpu_installed and tpu)
  )


def without_noise(text: str) -> str:
  """`text` without the CUDA plugin's driver lines (two threads' lines may share one)."""
  text = text.replace("GPU will not be used.WARNING:", "GPU will not be used.\nWARNING:")
  return "".join(
    line for line in text.splitlines(keepends=True) if not _CUDA_IMPORT_NOISE.search(line)
  )


@contextlib.contextmanager
def cuda_noise_filtered():
  """Within the block, file descriptor 2 goes to a file; at its end all of it but the CUDA
  plugin's driver lines is written to stderr. A no-op where an NVIDIA driver is present.
  For what loads the plugin's libraries: importing jax, the compile-only GPU client and
  XLA's GPU compiler (`flt_jax.aot`)."""
  if nvidia_driver_present() or not cuda_plugin_installed():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      sys.stderr.write(without_noise(captured.read().decode(errors="replace")))
      sys.stderr.flush()


def start() -> None:
  """Imports jax quietly and picks the backends (see the module docstring); a no-op when
  jax is already imported or no accelerator plugin is installed."""
  if "jax" in sys.modules:
    return
  cuda_installed = cuda_plugin_installed()
  libtpu_installed = _installed("libtpu")
  if not (cuda_installed or libtpu_installed):
    return
  with cuda_noise_filtered():
    import jax

  if "JAX_PLATFORMS" not in os.environ and cpu_only(
    cuda_installed=cuda_installed,
    gpu=nvidia_driver_present(),
    libtpu_installed=libtpu_installed,
    tpu=tpu_present(),
  ):
    jax.config.update("jax_platforms", "cpu")
  if cuda_installed and not nvidia_driver_present():
    # The plugin's library logs once more when JAX registers it, which it does on the
    # first use of a backend; register it now, inside the filter. This starts no backend
    # (CPU device counts set later still apply). A private JAX function: if it moves,
    # the line comes back, nothing else changes.
    from jax._src import xla_bridge

    with cuda_noise_filtered(), contextlib.suppress(AttributeError):
      xla_bridge._discover_and_register_pjrt_plugins()
