"""The real sharded train step compiled for GPU topologies on a CPU machine (the CUDA
plugin's compile-only client, flt_jax/gpu_targets.py's H100): 8 GPUs of one host, and two
hosts with the data axis over them. Tiny shapes; nothing runs. Skipped without the plugin
(`pip install --no-deps -r requirements-gpu-aot.txt`)."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import pytest

from flt_jax import aot, presets, run
from flt_jax.errors import ConfigError
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from tests.helpers.extras import installed

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [
  pytest.mark.needs_extra,
  pytest.mark.skipif(
    not installed("jax_plugins.xla_cuda12") or not installed("nvidia.cudnn"),
    reason="the CUDA plugin and cuDNN are not installed; `pip install --no-deps -r "
    "requirements-gpu-aot.txt` to compile for GPU topologies ahead of time on CPU",
  ),
]


@functools.cache
def _devices(topology: str):
  return aot.topology_devices(aot.parse_topology(topology))


def _tiny_config(**mesh):
  c = presets.make("FLT", 2, "cpu")
  c.model.update(vocab_size=256, dtype="bfloat16", attention_impl="auto", window_pattern="SL")
  c.model.update(d_model=128, n_head=2, n_kv_head=2, remat="loop")
  c.train.update(micro_batch_size=16, total_batch_tokens=32 * c.model.seq_len)
  c.mesh.update(cpu_devices=0, data=1, fsdp=-1, **mesh)
  return c


def test_the_8_gpu_train_step_compiles_with_cudnn():
  topology = aot.parse_topology("h100:8")
  devices = _devices("h100:8")
  program = run.build_program(_tiny_config(), None, devices)
  report, _ = aot.compile_train_step(program, topology.hbm_bytes, str(topology))
  assert (report.num_devices, report.device_kind) == (8, "NVIDIA H100 80GB HBM3")
  assert report.mesh == "data=1 fsdp=8 tensor=1" and report.num_micro == 2
  assert report.fits and 0 < report.total_bytes < 0.1 * aot.GIB
  assert report.attention.startswith("attention: auto -> cudnn (gpu")
  calls = dict(report.attention_calls)
  # One forward kernel per window (S and L), run again by the loop remat, and one backward.
  assert calls == {("cuDNN fmha", "fmhaSoftmax"): 4, ("cuDNN fmha", "fmhaSoftmaxBackward"): 2}
  text = aot.format_report(report)
  assert "of 79.65 GiB HBM: fits" in text and "JAX gives XLA 75% of it" in text
  assert text.splitlines()[-1].endswith(
    "cuDNN fmha: 6 custom calls (fmhaSoftmax 4, fmhaSoftmaxBackward 2)"
  )


def test_two_gpu_hosts_are_the_dcn_granules():
  devices = _devices("h100:2x8")
  assert {d.process_index for d in devices} == {0, 1} and {d.slice_index for d in devices} == {0}
  c = parallel_config.get_config()
  c.update(data=1, fsdp=8, dcn_data=2)
  mesh = mesh_lib.make_mesh(c, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
  hosts = [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(2)]
  assert hosts == [[0], [1]]  # the data axis crosses hosts, fsdp stays within one
  c.update(dcn_data=1, fsdp=-1)  # dcn sizes 1: every GPU of both hosts in one mesh
  assert dict(mesh_lib.make_mesh(c, devices).shape) == {"data": 1, "fsdp": 16, "tensor": 1}
  c.update(dcn_data=4, fsdp=-1)
  with pytest.raises(ConfigError, match="span 2 slice\\(s\\)/host\\(s\\)"):
    mesh_lib.make_mesh(c, devices)


def test_the_aot_command_compiles_for_two_hosts_of_8_gpus():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "flt_jax.aot",
      "--config=experiments/flt_12loop.py",
      "--topology=h100:2x8",
      "--config.mesh.dcn_data=2",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=8",
      "--config.mesh.cpu_devices=0",
      "--config.train.micro_batch_size=16",
      "--config.train.total_batch_tokens=4096",
      "--config.model.loops=2",
      "--config.model.dtype=bfloat16",
      "--config.model.attention_impl=auto",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  assert "on h100:2x8: 16 x NVIDIA H100 80GB HBM3 | mesh data=2 fsdp=8 tensor=1" in out, out
  assert "attention: auto -> cudnn (gpu: cuDNN flash attention) | cuDNN fmha: " in out, out
  assert "of 79.65 GiB HBM: fits" in out, out
  # Quiet on a machine without a GPU: no CUDA-driver or plugin warnings (XLA's own
  # warnings about this tiny step's shardings may remain).
  for noise in ("cuda drivers", "absl::InitializeLog", "Traceback", "plugin"):
    assert noise not in result.stderr, result.stderr[-3000:]
