"""The `config.mesh` section: device mesh sizes, the logical-axis rules table, multi-host.

Mesh axes, in order of increasing communication (the order `create_device_mesh` wants):

  data    pure data parallelism: params and optimizer state replicated, batch split.
  fsdp    data parallelism with params and optimizer state sharded (ZeRO-3 style):
          the batch is split over it too, weights are all-gathered per use.
  tensor  tensor (model) parallelism: attention heads, the MLP hidden dimension and the
          vocabulary are split; keep it within the fast interconnect.

`data`, `fsdp` and `tensor` are sizes within one slice (ICI); one of them may be -1 for
"the remaining devices". `dcn_data`, `dcn_fsdp`, `dcn_tensor` multiply them across
slices (multi-slice TPU over the data-centre network) or across hosts of a GPU cluster;
the global size of an axis is `<axis> * dcn_<axis>`.

`cpu_devices` splits a CPU-only host into several XLA devices before JAX starts: XLA:CPU
runs batched matmuls and most elementwise fusions on one thread each, so a data-parallel
mesh over one device per core uses the cores that a single device leaves idle.
`cpu_reuse_memory` keeps freed host memory for reuse, so that XLA:CPU's per-step buffers
do not page-fault in afresh every step.

`rules.<logical name>` maps a logical axis name carried by the params (Flax
`nn.with_logical_partitioning`) or by an activation constraint
(`nn.with_logical_constraint`) to a tuple of mesh axes (MaxText style); an empty tuple
keeps that dimension whole (replicated). On the command line a rule is written
`--config.mesh.rules.mlp=tensor` or `--config.mesh.rules.batch="('data','fsdp')"`.
"""

from __future__ import annotations

import ml_collections

from flt_jax.errors import config_error

MESH_AXES = ("data", "fsdp", "tensor")
DCN_FIELDS = tuple(f"dcn_{axis}" for axis in MESH_AXES)
DISTRIBUTED_MODES = ("auto", "on", "off")

# Logical axis -> mesh axes. The order is the precedence Flax applies within one array:
# a mesh axis already taken by an earlier name is not given to a later one (so MLA's
# c_kv_down [embed, kv_lora] shards embed over fsdp, and c_k_up [kv_lora, kv_heads]
# shards kv_lora over fsdp instead).
DEFAULT_RULES = (
  # Activations ([B, T, D] stream between blocks and on the loop carry).
  ("batch", ("data", "fsdp")),
  ("length", ()),
  ("act_embed", ()),
  # Parameters.
  ("vocab", ("tensor",)),
  ("embed", ("fsdp",)),
  ("heads", ("tensor",)),
  ("kv_heads", ("tensor",)),
  ("mlp", ("tensor",)),
  ("kv_lora", ("fsdp",)),
  ("layers", ()),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def get_config() -> ml_collections.ConfigDict:
  """Defaults: every device on fsdp (one device on CPU: nothing is sharded)."""
  c = ml_collections.ConfigDict()
  c.data = 1
  c.fsdp = -1  # -1: the devices the other axes leave
  c.tensor = 1
  c.dcn_data = 1  # across slices / hosts; multiplies `data`
  c.dcn_fsdp = 1
  c.dcn_tensor = 1
  # Let a mesh axis cut across a physical TPU torus axis (e.g. data=2 fsdp=8 on a 4x4
  # slice); off, each mesh axis must be a product of whole physical axes.
  c.allow_split_physical_axes = False
  c.rules = ml_collections.ConfigDict({name: axes for name, axes in DEFAULT_RULES})
  # jax.distributed.initialize(): "auto" on a detected multi-host environment (Cloud
  # TPU VM pod slice, SLURM with several tasks, JAX_COORDINATOR_ADDRESS set); "on"
  # always; "off" never (one process).
  c.distributed = "auto"
  # Multi-host runs write checkpoints and logs from every host, so the workdir must be
  # storage every host sees: gs://..., or a local path on a shared filesystem (NFS,
  # Lustre on a GPU cluster) when this is True.
  c.shared_filesystem = False
  # CPU only: split this host into this many XLA CPU devices (jax_num_cpu_devices) before
  # JAX starts; 0 keeps JAX's default (one device). XLA:CPU runs each batched matmul and
  # most elementwise fusions on one thread, so with the batch split over `data` one device
  # per core keeps the cores busy (the cpu preset: 2). JAX_NUM_CPU_DEVICES or
  # --xla_force_host_platform_device_count in XLA_FLAGS, when set, win. No effect on the
  # GPU and TPU devices.
  c.cpu_devices = 0
  # Host allocator: keep freed memory for reuse instead of unmapping it (glibc mallopt, set
  # before JAX starts; parallel/host_memory.py). XLA:CPU allocates each step's temporary
  # buffers afresh, so otherwise every step page-faults them in again. Resident memory
  # stays at its peak. The cpu preset: True.
  c.cpu_reuse_memory = False
  return c


def rule_axes(value) -> tuple[str, ...]:
  """A rule value as a tuple of mesh axes: ('a', 'b'), 'a', () or None, and the
  ('a,b',) that `--config.mesh.rules.x=a,b` gives."""
  if value is None:
    return ()
  parts = (value,) if isinstance(value, str) else tuple(value)
  return tuple(a.strip() for part in parts for a in str(part).split(",") if a.strip())


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks `config.mesh` on its own (device counts are checked when the mesh is made)."""
  fill = [axis for axis in MESH_AXES if c[axis] == -1]
  for axis in MESH_AXES:
    if not _is_int(c[axis]) or (c[axis] < 1 and c[axis] != -1):
      raise config_error(
        f"mesh.{axis}", c[axis], "must be a positive integer, or -1 for the remaining devices"
      )
  if len(fill) > 1:
    raise config_error(
      f"mesh.{fill[1]}",
      -1,
      f"only one mesh axis may be -1 (mesh.{fill[0]} already is)",
      f"give mesh.{fill[1]} an explicit size",
    )
  for field in DCN_FIELDS:
    if not _is_int(c[field]) or c[field] < 1:
      raise config_error(
        f"mesh.{field}", c[field], "must be a positive integer (1 = not split across slices)"
      )
  for name in c.rules:
    axes = rule_axes(c.rules[name])
    for axis in axes:
      if axis not in MESH_AXES:
        raise config_error(
          f"mesh.rules.{name}",
          c.rules[name],
          f"{axis!r} is not a mesh axis",
          f"use mesh axes from {MESH_AXES}, or () to keep the dimension whole",
        )
    if len(set(axes)) != len(axes):
      raise config_error(f"mesh.rules.{name}", c.rules[name], "names a mesh axis twice")
  if c.distributed not in DISTRIBUTED_MODES:
    raise config_error("mesh.distributed", c.distributed, f"choose one of {DISTRIBUTED_MODES}")
  if not isinstance(c.allow_split_physical_axes, bool):
    raise config_error(
      "mesh.allow_split_physical_axes", c.allow_split_physical_axes, "must be True or False"
    )
  if not isinstance(c.shared_filesystem, bool):
    raise config_error("mesh.shared_filesystem", c.shared_filesystem, "must be True or False")
  if not _is_int(c.cpu_devices) or c.cpu_devices < 0:
    raise config_error(
      "mesh.cpu_devices",
      c.cpu_devices,
      "must be a non-negative integer (0 = JAX's default of one CPU device)",
    )
  if not isinstance(c.cpu_reuse_memory, bool):
    raise config_error("mesh.cpu_reuse_memory", c.cpu_reuse_memory, "must be True or False")
