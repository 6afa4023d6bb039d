"""Multi-host runs: jax.distributed start-up and the workdir check.

Every host runs the same command. `initialize` must come before anything touches a JAX
backend (`jax.devices()`, array creation, an Orbax CheckpointManager). On Cloud TPU VMs of a pod slice and on SLURM
(one task per node) JAX finds the coordinator, process count and index itself; anywhere
else set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging

from flt_jax import quiet_start
from flt_jax.errors import ConfigError, config_error
from flt_jax.parallel import host_memory

# Set by hand (or by launch/gpu_slurm.sbatch) on clusters JAX does not detect itself.
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def has_tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether this machine has TPU chips attached (a Cloud TPU VM)."""
  return quiet_start.google_pci_device(pci_root)


def detect_cluster(
  environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None
) -> str | None:
  """'env' (JAX_COORDINATOR_ADDRESS), 'slurm' (several tasks), 'tpu' (a Cloud TPU VM:
  JAX reads the slice's hosts from its metadata; harmless on a single host), or None
  for a single-process run."""
  environ = os.environ if environ is None else environ
  tpu_vm = has_tpu_chips() if tpu_vm is None else tpu_vm
  if environ.get(_COORDINATOR_ENV):
    return "env"
  if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if tpu_vm or len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def distributed_args(environ: Mapping[str, str] | None = None) -> dict:
  """Keyword arguments for jax.distributed.initialize from JAX_* variables (empty where
  JAX detects the cluster itself)."""
  environ = os.environ if environ is None else environ
  kwargs = {}
  if environ.get(_COORDINATOR_ENV):
    kwargs["coordinator_address"] = environ[_COORDINATOR_ENV]
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if environ.get(env):
        try:
          kwargs[key] = int(environ[env])
        except ValueError:
          raise ConfigError(f"{env}={environ[env]!r} is not an integer") from None
  return kwargs


def should_initialize(
  mode: str, environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None
) -> bool:
  if mode == "on":
    return True
  if mode == "off":
    return False
  if mode == "auto":
    return detect_cluster(environ, tpu_vm) is not None
  raise config_error("mesh.distributed", mode, "choose one of ('auto', 'on', 'off')")


def cpu_devices_to_set(mesh_config, environ: Mapping[str, str] | None = None) -> int | None:
  """The CPU device count to give JAX (config.mesh.cpu_devices), or None: the config keeps
  JAX's default (0), or the environment already chooses (JAX_NUM_CPU_DEVICES, or
  --xla_force_host_platform_device_count in XLA_FLAGS, as the 8-device tests set it)."""
  environ = os.environ if environ is None else environ
  count = int(mesh_config.get("cpu_devices", 0))
  if count <= 0 or environ.get("JAX_NUM_CPU_DEVICES"):
    return None
  if "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
    return None
  return count


def configure_cpu_devices(mesh_config, environ: Mapping[str, str] | None = None) -> None:
  """Applies cpu_devices_to_set before JAX's backends start. Once they have started (an
  earlier JAX operation in this process, e.g. a caller's own), the count can no longer
  change: the run goes on with the devices there are and says so."""
  count = cpu_devices_to_set(mesh_config, environ)
  if count is None:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    have = len(jax.local_devices(backend="cpu"))
    if have != count:
      logging.warning(
        "config.mesh.cpu_devices=%d not applied: JAX's CPU backend already started with "
        "%d device(s) in this process; the run uses those. It applies when nothing in the "
        "process has used JAX before the run starts (as with python -m flt_jax.main).",
        count,
        have,
      )


def initialize(
  mesh_config, environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None
) -> bool:
  """Sets the host allocator (config.mesh.cpu_reuse_memory) and the CPU device count (configure_cpu_devices), then starts jax.distributed when
  `config.mesh.distributed` asks for it (see should_initialize); returns whether it did.
  Safe to call twice."""
  if mesh_config.get("cpu_reuse_memory", False):
    host_memory.reuse_freed_memory()
  configure_cpu_devices(mesh_config, environ)
  if not should_initialize(mesh_config.distributed, environ, tpu_vm):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**distributed_args(environ))
  return True


def is_remote_path(path) -> bool:
  """A URL every host can reach (gs://, s3://, ...), as opposed to a local path."""
  return "://" in str(path) and not str(path).startswith("file://")


def check_workdir(workdir, process_count: int, shared_filesystem: bool = False) -> None:
  """A run over several processes writes checkpoints from every host: its workdir must
  be on storage they all see."""
  if process_count > 1 and not is_remote_path(workdir) and not shared_filesystem:
    raise ConfigError(
      f"--workdir={workdir} is a local path, but this run spans {process_count} hosts, "
      "which all write checkpoints and need to see the same files. Fix: use "
      "--workdir=gs://BUCKET/RUN (Cloud Storage), or set "
      "--config.mesh.shared_filesystem=True if the path is on a filesystem every host "
      "mounts (NFS, Lustre)."
    )
