"""NVIDIA GPUs to compile for without one: XLA's device description of each, built from the
published specs, for `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)` (flt_jax.aot's GPU topologies).

XLA's GPU compiler reads the device from a `stream_executor.GpuTargetConfigProto`: the
compute capability picks the instruction set (sm_90a, sm_80) for Triton and the cuDNN
graphs, the SM count and shared memory per block/SM bound the kernels' tiles and
occupancy, registers bound the threads per block, and memory size and bandwidth feed the
scheduler's memory limit and cost model. The values below come from NVIDIA's data
sheets and CUDA's per-compute-capability tables (H100 SXM5 80GB, H200 SXM 141GB, A100
SXM4 80GB). jaxlib 0.10.2's proto has no `collective_memory_granularity`, so none is
written.
"""

from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
# The cuDNN of requirements-gpu.txt; XLA builds its cuDNN graphs (attention) for it.
CUDNN_VERSION = (9, 28, 0)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """One GPU model's published figures (per device; an SM is XLA's 'core')."""

  name: str  # as the driver reports it (device_kind)
  compute_capability: tuple[int, int]
  accelerated_features: bool  # sm_90a: Hopper's wgmma/TMA instructions for Triton
  sm_count: int
  fp32_cores_per_sm: int
  clock_ghz: float  # boost clock of the SMs
  memory_bytes: int  # as the driver reports it (nvidia-smi's total)
  memory_bandwidth: float  # bytes per second
  l2_cache_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int  # the most one block can opt into
  registers_per_sm: int = 64 * KIB
  registers_per_block: int = 64 * KIB
  threads_per_sm: int = 2048
  shared_memory_per_block: int = 48 * KIB  # without opting in


# Hopper (GH100, compute capability 9.0): 132 SMs in the SXM parts, 228 KiB of shared
# memory per SM (227 KiB per block), 50 MiB L2, 1.98 GHz boost.
H100_SXM = GpuSpec(
  name="NVIDIA H100 80GB HBM3",
  compute_capability=(9, 0),
  accelerated_features=True,
  sm_count=132,
  fp32_cores_per_sm=128,
  clock_ghz=1.98,
  memory_bytes=81559 * MIB,
  memory_bandwidth=3.35e12,
  l2_cache_bytes=50 * MIB,
  shared_memory_per_sm=228 * KIB,
  shared_memory_per_block_optin=227 * KIB,
)
# The same GH100 with 141 GB of HBM3e at 4.8 TB/s.
H200_SXM = dataclasses.replace(
  H100_SXM, name="NVIDIA H200", memory_bytes=143771 * MIB, memory_bandwidth=4.8e12
)
# Ampere (GA100, compute capability 8.0): 108 SMs, 164 KiB of shared memory per SM
# (163 KiB per block), 40 MiB L2, 1.41 GHz boost, 80 GB HBM2e at 2.04 TB/s.
A100_SXM = GpuSpec(
  name="NVIDIA A100-SXM4-80GB",
  compute_capability=(8, 0),
  accelerated_features=False,
  sm_count=108,
  fp32_cores_per_sm=64,
  clock_ghz=1.41,
  memory_bytes=81920 * MIB,
  memory_bandwidth=2.039e12,
  l2_cache_bytes=40 * MIB,
  shared_memory_per_sm=164 * KIB,
  shared_memory_per_block_optin=163 * KIB,
)

GPUS = {"h100": H100_SXM, "h200": H200_SXM, "a100": A100_SXM}


def target_config(spec: GpuSpec) -> str:
  """The GpuTargetConfigProto text XLA compiles `spec` from."""
  major, minor = spec.compute_capability
  features = "\n    feature_extension: ACCELERATED_FEATURES" if spec.accelerated_features else ""
  cudnn_major, cudnn_minor, cudnn_patch = CUDNN_VERSION
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: {spec.shared_memory_per_block}
  shared_memory_per_core: {spec.shared_memory_per_sm}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  threads_per_core_limit: {spec.threads_per_sm}
  core_count: {spec.sm_count}
  fpus_per_core: {spec.fp32_cores_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec.memory_bandwidth)}
  l2_cache_size: {spec.l2_cache_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
  registers_per_core_limit: {spec.registers_per_sm}
  registers_per_block_limit: {spec.registers_per_block}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{features}
  }}
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn_major}
  minor: {cudnn_minor}
  patch: {cudnn_patch}
}}
device_description_str: "{spec.name}"
"""
