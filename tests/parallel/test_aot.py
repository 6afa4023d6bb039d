"""python -m flt_jax.aot compiles the real sharded train step for a TPU topology with
libtpu's compile-only client (no TPU attached). Skipped without libtpu; install it with
`pip install -r requirements-tpu.txt`."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from tests.helpers.extras import needs

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = needs("libtpu", "requirements-tpu.txt", "compiling for a TPU topology")


def _python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
  # Another process on the machine may hold libtpu's lock file; the compile-only client
  # does not need exclusive use of any TPU.
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  result = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result


def test_aot_compiles_the_paper_step_for_v5e_4x4():
  out = _python(
    [
      "-m",
      "flt_jax.aot",
      "--config=experiments/flt_12loop.py:paper",
      "--topology=v5e:4x4",
      "--config.mesh.data=4",
      "--config.mesh.fsdp=4",
    ],
    timeout=1200,
  ).stdout
  assert "FLT_12loop paper K=12 on v5e:4x4: 16 x TPU v5 lite" in out, out
  assert "mesh data=4 fsdp=4 tensor=1 | remat loop | global batch 512 in 16 micro-batch" in out
  gib = {
    name: float(value)
    for name, value in re.findall(r"^  (\w+)\s+([\d.]+) GiB", out, flags=re.MULTILINE)
  }
  assert set(gib) >= {"arguments", "outputs", "aliased", "temporaries", "total"}, out
  # Params (~57M) and optimizer state in float32, sharded 16 ways: 0.1-0.3 GiB a chip.
  assert 0.05 < gib["arguments"] < 0.5
  assert gib["aliased"] > 0.9 * gib["outputs"]  # the donated state is updated in place
  assert 0 < gib["total"] < 16 and "of 16.00 GiB HBM: fits" in out
  # Loop remat re-runs every loop's forward once more: the traced matmuls exceed the
  # 6ND-style model count, but by less than a second full forward+backward.
  ratio = float(re.search(r"traced matmuls\s+\S+\s+\(([\d.]+) x model", out).group(1))
  assert 1.05 < ratio < 1.6, out


def test_two_slice_mesh_puts_the_slices_on_the_data_axis():
  code = """
from flt_jax import aot
from flt_jax.parallel import config, mesh
devices = aot.topology_devices(aot.parse_topology("2xv5e:4x4"))
c = config.get_config()
c.update(data=4, fsdp=4, dcn_data=2)
m = mesh.make_mesh(c, devices)
print("shape", dict(m.shape))
print("slices", [sorted({d.slice_index for d in m.devices[i].flat}) for i in range(8)])
for update in ({"dcn_data": 1}, {"dcn_data": 2, "data": 2, "fsdp": 8}):
  c.update(update)
  try:
    mesh.make_mesh(c, devices)
  except ValueError as e:
    print("error", e)
c.allow_split_physical_axes = True
print("split", dict(mesh.make_mesh(c, devices).shape))
"""
  out = _python(["-c", code], timeout=300).stdout
  assert "shape {'data': 8, 'fsdp': 4, 'tensor': 1}" in out, out
  assert "slices [[0], [0], [0], [0], [1], [1], [1], [1]]" in out, out  # ICI data=4 per slice
  assert "error config.mesh.dcn_data=1 is invalid: the devices span 2 TPU slices" in out, out
  assert "does not map onto the physical TPU axes" in out, out  # fsdp=8 on a 4x4 torus
  assert "split {'data': 4, 'fsdp': 8, 'tensor': 1}" in out, out
