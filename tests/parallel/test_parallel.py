"""Mesh config, rules, shardings, multi-host helpers and FLOP counting on one device
(8-device behaviour: test_devices8.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax import aot
from flt_jax import config as flt_config
from flt_jax.errors import ConfigError
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import multihost
from flt_jax.parallel import sharding as sharding_lib
from tests.parallel import common

# ----------------------------------------------------------------------------
# Config and mesh shapes.
# ----------------------------------------------------------------------------


def test_mesh_section_is_in_the_defaults_and_valid():
  config = flt_config.default_config()
  parallel_config.validate(config.mesh)
  rules = dict(sharding_lib.logical_rules(config.mesh))
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
  assert rules["mlp"] == "tensor" and rules["layers"] is None
  # Every logical name the model's params carry has a rule.
  boxed = common.program().abstract_state_boxed.params
  names = set()
  for box in jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names")):
    names.update(n for n in box.names if n)
  assert names <= set(rules), names - set(rules)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("data", 0, r"config.mesh.data=0 is invalid: must be a positive integer, or -1"),
    ("tensor", -1, r"config.mesh.tensor=-1 is invalid: only one mesh axis may be -1"),
    ("dcn_fsdp", 0, r"config.mesh.dcn_fsdp=0 is invalid"),
    ("distributed", "yes", r"config.mesh.distributed='yes' is invalid: choose one of"),
    ("cpu_devices", -1, r"config.mesh.cpu_devices=-1 is invalid: must be a non-negative"),
  ],
)
def test_bad_mesh_values_are_named(field, value, message):
  mesh = parallel_config.get_config()
  mesh[field] = value
  with pytest.raises(ConfigError, match=message):
    parallel_config.validate(mesh)


def test_unknown_mesh_axis_in_the_rules_is_refused():
  mesh = parallel_config.get_config()
  mesh.rules.embed = ("fsdpp",)
  message = r"config.mesh.rules.embed=\('fsdpp',\) is invalid: 'fsdpp' is not a mesh axis"
  with pytest.raises(ConfigError, match=message):
    parallel_config.validate(mesh)
  with pytest.raises(ConfigError, match=message):
    sharding_lib.logical_rules(mesh)
  mesh.rules.embed = ("fsdp,tensor",)  # what --config.mesh.rules.embed=fsdp,tensor gives
  assert dict(sharding_lib.logical_rules(mesh))["embed"] == ("fsdp", "tensor")


def test_logical_name_without_a_rule_is_refused():
  prog = common.program()
  rules = tuple(r for r in sharding_lib.logical_rules(prog.config.mesh) if r[0] != "mlp")
  mesh = mesh_lib.make_mesh(prog.config.mesh)
  with pytest.raises(ConfigError, match=r"no rule for the logical axis 'mlp' of .*c_fc"):
    sharding_lib.state_shardings(prog.abstract_state_boxed, mesh, rules)


def _mesh(**sizes):
  mesh = parallel_config.get_config()
  mesh.update(sizes)
  return mesh


def test_mesh_shape_fills_minus_one_and_checks_the_product():
  assert mesh_lib.resolve_shape(_mesh(data=2, fsdp=-1), 16) == ((2, 8, 1), (1, 1, 1))
  assert mesh_lib.resolve_shape(_mesh(data=-1, fsdp=2, tensor=2), 256) == ((64, 2, 2), (1, 1, 1))
  # Two slices of 16 chips: dcn_data=2 doubles data across slices.
  assert mesh_lib.resolve_shape(_mesh(data=4, fsdp=-1, dcn_data=2), 32, 2) == (
    (4, 4, 1),
    (2, 1, 1),
  )
  with pytest.raises(ConfigError, match=r"data \* fsdp \* tensor = 8 but there are 16"):
    mesh_lib.resolve_shape(_mesh(data=2, fsdp=4), 16)
  with pytest.raises(ConfigError, match=r"multiply to 1 but the devices span 2 slice"):
    mesh_lib.resolve_shape(_mesh(), 32, 2)


def test_one_device_mesh():
  mesh = mesh_lib.make_mesh(_mesh())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert mesh_lib.describe(mesh).startswith("data=1 fsdp=1 tensor=1 (1 devices")


# ----------------------------------------------------------------------------
# Shardings and the step on one device.
# ----------------------------------------------------------------------------


def test_optimizer_state_follows_the_params():
  prog = common.program()
  mesh = mesh_lib.make_mesh(prog.config.mesh)
  rules = sharding_lib.logical_rules(prog.config.mesh)
  shardings = sharding_lib.state_shardings(prog.abstract_state_boxed, mesh, rules)
  # Same tree as the unboxed state, one NamedSharding per leaf.
  unboxed = jax.tree_util.tree_structure(
    jax.tree.map(lambda x: 0, sharding_lib.with_shardings(prog.abstract_state_boxed, shardings))
  )
  assert jax.tree_util.tree_structure(jax.tree.map(lambda x: 0, shardings)) == unboxed
  specs = {
    jax.tree_util.keystr(path): s.spec
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
  }
  c_fc = "['blocks']['layers']['block']['mlp']['c_fc']['kernel']"
  assert specs[".params" + c_fc] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  momentum = [k for k in specs if k.endswith(".mu" + c_fc)]
  adam_nu = [k for k in specs if k.endswith(".nu['wte']['embedding']")]
  assert len(momentum) == 1 and specs[momentum[0]] == specs[".params" + c_fc]  # Muon momentum
  assert len(adam_nu) == 1 and specs[adam_nu[0]] == specs[".params['wte']['embedding']"]
  assert specs[".step"] == jax.sharding.PartitionSpec()


def test_interleaved_micro_batches_take_strided_rows():
  rows_B = np.arange(12)
  out = sharding_lib.interleave_micro_batches({"x": rows_B}, 3)["x"]
  # train_step splits [B] into 3 contiguous micro-batches of 4 rows each.
  np.testing.assert_array_equal(
    np.asarray(out).reshape(3, 4), [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
  )
  assert sharding_lib.interleave_micro_batches({"x": rows_B}, 1)["x"] is rows_B


# ----------------------------------------------------------------------------
# Multi-host helpers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "environ, kind",
  [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, None),  # single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),  # multi-slice
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "slurm"),
    ({"JAX_COORDINATOR_ADDRESS": "node0:1234"}, "env"),
  ],
)
def test_cluster_detection(environ, kind):
  assert multihost.detect_cluster(environ, tpu_vm=False) == kind
  assert multihost.should_initialize("auto", environ, tpu_vm=False) == (kind is not None)
  assert multihost.should_initialize("on", environ, tpu_vm=False)
  assert not multihost.should_initialize("off", environ, tpu_vm=False)
  # On a Cloud TPU VM JAX finds the slice's hosts itself (metadata server).
  assert multihost.detect_cluster(environ, tpu_vm=True) == (kind or "tpu")


def test_tpu_chips_are_recognised_by_pci_vendor(tmp_path):
  (tmp_path / "0000:00:04.0").mkdir()
  (tmp_path / "0000:00:04.0" / "vendor").write_text("0x8086\n")
  assert not multihost.has_tpu_chips(str(tmp_path))
  (tmp_path / "0000:00:05.0").mkdir()
  (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
  assert multihost.has_tpu_chips(str(tmp_path))


def test_distributed_args_from_the_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "n0:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert multihost.distributed_args(environ) == {
    "coordinator_address": "n0:9",
    "num_processes": 2,
    "process_id": 1,
  }
  assert multihost.distributed_args({"SLURM_JOB_ID": "7"}) == {}  # JAX reads SLURM itself
  with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID='x' is not an integer"):
    multihost.distributed_args({"JAX_COORDINATOR_ADDRESS": "n0:9", "JAX_PROCESS_ID": "x"})
  # One process: nothing to start.
  assert not multihost.initialize(parallel_config.get_config(), {}, tpu_vm=False)


def test_cpu_device_count_comes_from_the_config_unless_the_environment_sets_it():
  mesh = parallel_config.get_config()
  assert multihost.cpu_devices_to_set(mesh, {}) is None  # 0: JAX's default
  mesh.cpu_devices = 2
  assert multihost.cpu_devices_to_set(mesh, {}) == 2
  assert multihost.cpu_devices_to_set(mesh, {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime"}) == 2
  forced = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert multihost.cpu_devices_to_set(mesh, forced) is None
  assert multihost.cpu_devices_to_set(mesh, {"JAX_NUM_CPU_DEVICES": "4"}) is None


def test_cpu_device_count_after_jax_started_is_reported_not_applied(caplog):
  # conftest started the backends with the environment's device count.
  have = len(jax.local_devices(backend="cpu"))
  mesh = parallel_config.get_config()
  mesh.cpu_devices = have + 2
  with caplog.at_level("WARNING"):
    multihost.configure_cpu_devices(mesh, {})
  assert f"config.mesh.cpu_devices={have + 2} not applied" in caplog.text
  assert f"already started with {have} device(s)" in caplog.text
  assert len(jax.local_devices(backend="cpu")) == have
  caplog.clear()
  mesh.cpu_devices = have  # what there already is: nothing to say
  multihost.configure_cpu_devices(mesh, {})
  assert "not applied" not in caplog.text


def test_multi_host_workdir_must_be_shared():
  with pytest.raises(ConfigError, match=r"--workdir=/tmp/run is a local path, but this run spans"):
    multihost.check_workdir("/tmp/run", process_count=2)
  multihost.check_workdir("gs://bucket/run", process_count=2)
  multihost.check_workdir("/nfs/run", process_count=2, shared_filesystem=True)
  multihost.check_workdir("/tmp/run", process_count=1)


# ----------------------------------------------------------------------------
# AOT pieces that need no TPU.
# ----------------------------------------------------------------------------


def test_topology_strings():
  assert aot.parse_topology("v5e:16x16") == aot.Topology("v5e:16x16", "v5e", 1)
  assert aot.parse_topology("2xv4:4x4x4") == aot.Topology("v4:4x4x4", "v4", 2)
  assert str(aot.parse_topology("2xv6e:8x8")) == "2xv6e:8x8"
  assert aot.parse_topology("v5p:2x2x2").hbm_bytes == 95 * aot.GIB
  with pytest.raises(ConfigError, match=r"--topology='v5-16' is not a TPU or GPU topology"):
    aot.parse_topology("v5-16")


def test_matmul_flops_count_scan_lengths_and_remat():
  n = 8
  x = jnp.ones((n, n))
  matmul = 2.0 * n**3

  def forward(x, remat):
    body = lambda y: jnp.tanh(y @ y)
    body = jax.checkpoint(body) if remat else body
    return jax.lax.scan(lambda c, _: (body(c), None), x, None, length=3)[0].sum()

  assert aot.jaxpr_matmul_flops(jax.make_jaxpr(lambda x: forward(x, False))(x).jaxpr) == 3 * matmul
  grad = jax.grad(lambda x: forward(x, False))
  assert aot.jaxpr_matmul_flops(jax.make_jaxpr(grad)(x).jaxpr) == 3 * 3 * matmul  # fwd + 2 bwd
  grad_remat = jax.grad(lambda x: forward(x, True))
  assert aot.jaxpr_matmul_flops(jax.make_jaxpr(grad_remat)(x).jaxpr) == 3 * 4 * matmul


def test_matmul_counts_key_each_product_by_shapes_and_dimensions():
  a, w = jnp.ones((4, 6, 8)), jnp.ones((8, 5))

  def f(a, w):
    y = jax.lax.scan(lambda c, _: (c, jnp.einsum("btd,de->bte", a, w)), 0, None, length=3)[1]
    return jax.lax.cond(a.sum() > 0, lambda: y @ w.T, lambda: y[..., :1] @ jnp.ones((1, 8)))

  counts = aot.jaxpr_matmuls(jax.make_jaxpr(f)(a, w).jaxpr)
  plain = ((4, 6, 8), (8, 5), (((2,), (0,)), ((), ())))
  back = ((3, 4, 6, 5), (5, 8), (((3,), (0,)), ((), ())))  # the costlier branch only
  assert counts == {plain: 3, back: 1}
  assert aot.matmul_flops(plain) == 2 * 4 * 6 * 8 * 5
