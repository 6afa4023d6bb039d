"""Work that cannot fit is refused before it starts, with an estimate: a training run's
host batch against the host's available memory, and its compiled train steps
(`memory_analysis()`) against each device's memory, checked before the workdir is
touched. The compiled steps are the ones the loop then runs (no second compile)."""

from __future__ import annotations

import jax

from flt_jax.errors import config_error

GIB = 1024**3


def host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), or None where it is unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def device_bytes(device) -> int | None:
  """Memory one device may use: its allocator's limit (GPU, TPU), or on CPU the host's
  available memory shared among the process's CPU devices; None where unknown."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    available = host_available_bytes()
    if available is not None:
      return available // max(1, len([d for d in jax.local_devices() if d.platform == "cpu"]))
  return None


def _gib(n: float) -> str:
  return f"{n / GIB:,.2f} GiB"


def check_host_batch(program, available: int | None = None) -> None:
  """ConfigError if one host batch (all micro-batches of a step, inputs and targets as
  int32, plus the pipeline's rows of seq_len + 1 tokens) cannot fit the host's memory."""
  available = host_available_bytes() if available is None else available
  if available is None:
    return
  rows = program.global_batch_size // jax.process_count()
  keys = 2 + (2 if program.model_cfg.separate_documents else 0)
  need = rows * (program.model_cfg.seq_len + 1) * 4 * (keys + 1)
  if need > available:
    raise config_error(
      "train.total_batch_tokens",
      program.config.train.total_batch_tokens,
      f"one step's batch on this host ({rows:,} sequences of {program.model_cfg.seq_len:,} "
      f"tokens) needs about {_gib(need)} of host memory, and {_gib(available)} is available",
      "lower train.total_batch_tokens or model.seq_len",
    )


def memory_bytes(compiled) -> int | None:
  """Arguments + outputs - aliased (donated) + temporaries of a compiled program, per
  device; None when the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # backends without a memory analysis
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def check_step(program, compiled, what: str = "the train step") -> None:
  """ConfigError if the compiled step needs more memory per device than a device has."""
  device = program.mesh.devices.flat[0]
  need, have = memory_bytes(compiled), device_bytes(device)
  if need is None or have is None or need <= have:
    return
  micro = program.config.train.micro_batch_size
  raise config_error(
    "train.micro_batch_size",
    micro,
    f"{what} needs about {_gib(need)} per device (XLA's memory analysis of the compiled "
    f"step: arguments, outputs and temporaries), and a {device.platform} device here has "
    f"{_gib(have)}",
    "lower train.micro_batch_size (gradient accumulation keeps train.total_batch_tokens) "
    "or model.seq_len, set model.remat=block or loop, or shard over more devices "
    "(config.mesh)",
  )
