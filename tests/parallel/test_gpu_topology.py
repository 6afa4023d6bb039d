"""GPU topologies for flt_jax.aot without any plugin: parsing, the device descriptions
XLA compiles from, and the report's count of attention kernels in compiled HLO."""

import os
import re

import pytest

from flt_jax import aot, gpu_targets
from flt_jax.errors import ConfigError


def test_gpu_topology_strings_name_hosts_and_gpus():
  assert aot.parse_topology("h100:8") == aot.Topology("h100:8", "h100", 1, 1, 8)
  two_hosts = aot.parse_topology("h100:2x8")
  assert (two_hosts.hosts, two_hosts.gpus_per_host, str(two_hosts)) == (2, 8, "h100:2x8")
  assert two_hosts.platform == "gpu" and aot.parse_topology("v5e:2x2").platform == "tpu"
  assert aot.parse_topology("h200:8").hbm_bytes == 143771 * 2**20
  assert aot.parse_topology("a100:1x4").name == "a100:4"
  for bad in ("h100:0", "h100:0x8", "h900:8", "h100", "h100:8x"):
    with pytest.raises(ConfigError, match=r"is not a TPU or GPU topology.*h100:2x8"):
      aot.parse_topology(bad)


@pytest.mark.parametrize("gpu, arch, sms", [("h100", (9, 0), 132), ("a100", (8, 0), 108)])
def test_device_descriptions_carry_the_published_figures(gpu, arch, sms):
  spec = gpu_targets.GPUS[gpu]
  text = gpu_targets.target_config(spec)
  assert f"core_count: {sms}" in text
  assert re.search(rf"cuda_compute_capability {{\s+major: {arch[0]}\s+minor: {arch[1]}", text)
  assert ("ACCELERATED_FEATURES" in text) == (gpu == "h100")  # sm_90a on Hopper only
  assert f"device_memory_size: {spec.memory_bytes}" in text
  assert "collective_memory_granularity" not in text  # unknown to jaxlib 0.10.2's proto
  assert spec.shared_memory_per_block_optin < spec.shared_memory_per_sm


HLO = """
  %pallas_call.7 = (bf16[1,256,8,64]) custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(fb)/jvp(flt_flash_fwd)/pallas_call"}
  %pallas_call.10 = bf16[1,256,8,64] custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(fb)/transpose(jvp(flt_flash_dq))/pallas_call"}
  %dot_product_attention_fwd.5 = (bf16[1,8,256,64]) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="x"}
  %splash_mha_dkv_no_residuals.1 = (f32[2,512,128]) custom-call(%g), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]}
  %other.3 = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/some_kernel/pallas_call"}
  %custom-call.44 = bf16[2,1024,64] custom-call(), custom_call_target="AllocateBuffer"
  %fusion.1 = f32[8] fusion(%x), kind=kLoop
"""


def test_attention_kernel_calls_are_counted_by_family_and_kernel():
  calls = aot.attention_kernel_calls(HLO)
  assert calls == {
    ("Triton flash", "flt_flash_fwd"): 1,
    ("Triton flash", "flt_flash_dq"): 1,
    ("cuDNN fmha", "fmhaSoftmax"): 1,
    ("splash", "splash_mha_dkv_no_residuals"): 1,
  }
  line = aot.describe_attention_calls(calls)
  assert "Triton flash: 2 custom calls (flt_flash_dq 1, flt_flash_fwd 1)" in line
  assert "cuDNN fmha: 1 custom calls (fmhaSoftmax 1)" in line
  assert aot.describe_attention_calls({}) == "no attention kernel (XLA's own fusions)"


def test_cloud_tpu_types_name_the_slice():
  # libtpu stays quiet off a TPU VM when told the slice (aot.topology_devices sets it).
  assert aot._cloud_tpu_type(aot.parse_topology("v5e:4x4")) == "v5litepod-16"
  assert aot._cloud_tpu_type(aot.parse_topology("2xv6e:8x8")) == "v6e-64"
  assert aot._cloud_tpu_type(aot.parse_topology("v4:2x2x2")) == "v4-16"
  before = dict(os.environ)
  with aot._libtpu_told_the_slice(aot.parse_topology("v5e:2x2")):
    pass
  assert dict(os.environ) == before  # children do not take this machine for a TPU VM
