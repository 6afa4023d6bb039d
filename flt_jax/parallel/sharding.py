"""Logical-axis sharding: the rules table, shardings of the train state and batch, and
jit-compiled steps with explicit in/out shardings.

Params carry logical axis names (`nn.with_logical_partitioning`); `config.mesh.rules`
maps each name to mesh axes (MaxText style) and Flax turns the pair into a
`NamedSharding` per array. The optimizer state is sharded like the params it mirrors
(Adam moments, Muon momentum): its leaves are matched to params by key path and shape,
so no full copy of any param-sized buffer lives on one device.

Call order (see WORKSPACE.md, "Sharded training"):

  rules = logical_rules(config.mesh)
  mesh = make_mesh(config.mesh)                          # flt_jax.parallel.mesh
  shardings = state_shardings(abstract_state, mesh, rules)
  state = create_sharded(init_fn, mesh, rules, shardings, rng)   # or restore with them
  check_batch(global_batch, micro_batch, mesh, rules)
  step = jit_train_step(train_step_fn, mesh, rules, shardings, batch_sharding(mesh, rules))
  state, metrics = step(state, make_global_batch(host_batch, batch_sharding(...), B))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flt_jax.errors import ConfigError, config_error
from flt_jax.parallel.config import LOGICAL_AXES, MESH_AXES, rule_axes

# Logical names of a [B, T] token batch and of the [B, T, D] activation stream.
BATCH_AXES = ("batch", "length")
ACTIVATION_AXES = ("batch", "length", "act_embed")


# ----------------------------------------------------------------------------
# Rules.
# ----------------------------------------------------------------------------


def logical_rules(mesh_config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """`config.mesh.rules` as Flax logical-axis rules, in precedence order.

  The known names come first in `LOGICAL_AXES` order (a ConfigDict iterates its keys
  sorted), any other name after them.
  """
  table = mesh_config.rules
  present = list(table)
  names = [n for n in LOGICAL_AXES if n in present] + sorted(
    n for n in present if n not in LOGICAL_AXES
  )
  rules = []
  for name in names:
    axes = rule_axes(table[name])
    unknown = [axis for axis in axes if axis not in MESH_AXES]
    if unknown:
      raise config_error(
        f"mesh.rules.{name}",
        table[name],
        f"{unknown[0]!r} is not a mesh axis",
        f"use mesh axes from {MESH_AXES}, or () to keep the dimension whole",
      )
    rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_to_sharding(names, mesh: Mesh, rules) -> NamedSharding:
  """The NamedSharding of one array whose dimensions carry logical `names`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


# ----------------------------------------------------------------------------
# State shardings.
# ----------------------------------------------------------------------------


def _dict_key_suffix(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a key path: a param's path inside any tree that
  holds a params-shaped subtree (optimizer moments under `.mu`, `.nu`, ...)."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _check_names_have_rules(abstract_tree, rules) -> None:
  known = {name for name, _ in rules}
  for path, box in jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=_is_box)[0]:
    if not _is_box(box):
      continue
    for name in box.names:
      if name is not None and name not in known:
        raise config_error(
          "mesh.rules",
          sorted(known),
          f"has no rule for the logical axis {name!r} of {jax.tree_util.keystr(path)}",
          f"add config.mesh.rules.{name} (mesh axes from {MESH_AXES}, or () to keep it whole)",
        )


def _spec_size(spec_entry, mesh: Mesh) -> int:
  if spec_entry is None:
    return 1
  axes = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
  return math.prod(mesh.shape[axis] for axis in axes)


def _check_divisible(path, shape, sharding: NamedSharding) -> None:
  for dim, (size, entry) in enumerate(zip(shape, sharding.spec)):
    ways = _spec_size(entry, sharding.mesh)
    if size % ways:
      raise ConfigError(
        f"{jax.tree_util.keystr(path)} has shape {tuple(shape)}: dimension {dim} (size "
        f"{size}) cannot be split {ways} ways over mesh axes {entry}. Fix: change the "
        "config.mesh sizes, or the config.mesh.rules entry that maps this dimension to "
        f"{entry} (e.g. to () to keep it whole)."
      )


def state_shardings(abstract_state, mesh: Mesh, rules):
  """NamedShardings for every leaf of `abstract_state` (structure of the unboxed state).

  `abstract_state` is a params tree or a train state with a `params` field, as
  `jax.eval_shape` gives it, with Flax `nn.Partitioned` boxes kept on the params (the
  boxes carry the logical names). Leaves outside the params (optimizer moments, Muon
  momentum) whose key path ends in a param's path and whose shape equals it get that
  param's sharding; boxed leaves keep their own names; everything else (step counters,
  scalar hyperparameters) is replicated.
  """
  _check_names_have_rules(abstract_state, rules)
  specs = nn.get_partition_spec(abstract_state)
  own = nn.logical_to_mesh_sharding(specs, mesh, rules)
  unboxed = nn.meta.unbox(abstract_state)
  params = unboxed.params if hasattr(unboxed, "params") else unboxed
  params_own = own.params if hasattr(own, "params") else own
  by_path = {}
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(params_own)
  ):
    by_path[_dict_key_suffix(path)] = (tuple(leaf.shape), sharding)

  def choose(path, leaf, sharding):
    shape = tuple(getattr(leaf, "shape", ()))
    match = by_path.get(_dict_key_suffix(path))
    if match is not None and match[0] == shape:
      sharding = match[1]
    _check_divisible(path, shape, sharding)
    return sharding

  return jax.tree_util.tree_map_with_path(choose, unboxed, own)


def with_shardings(abstract_state, shardings):
  """The unboxed abstract state as ShapeDtypeStructs carrying `shardings`: the target
  for `jit(...).lower` and for an Orbax restore onto this mesh."""
  return jax.tree.map(
    lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
    nn.meta.unbox(abstract_state),
    shardings,
  )


def bytes_per_device(tree) -> dict:
  """{device: bytes} held by the addressable shards of the arrays in `tree`."""
  held: dict = {}
  for array in jax.tree_util.tree_leaves(tree):
    for shard in array.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (data * fsdp with the default rules)."""
  return _spec_size(logical_to_sharding(BATCH_AXES, mesh, rules).spec[0], mesh)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [B, T] token batch: B over the `batch` rule's mesh axes."""
  return logical_to_sharding(BATCH_AXES, mesh, rules)


def check_batch(global_batch: int, micro_batch: int, mesh: Mesh, rules) -> None:
  """Every micro-batch must split evenly over the batch's mesh axes (each device gets
  whole sequences of every micro-batch)."""
  shards = batch_shards(mesh, rules)
  axes = batch_sharding(mesh, rules).spec[0]
  if global_batch % shards:
    raise config_error(
      "train.total_batch_tokens",
      f"{global_batch} sequences per step",
      f"the global batch does not divide by the {shards} batch shards (mesh axes {axes})",
      f"make the global batch (total_batch_tokens / seq_len) a multiple of {shards}, or "
      "shrink mesh.data/mesh.fsdp (e.g. more mesh.tensor)",
    )
  if micro_batch % shards:
    raise config_error(
      "train.micro_batch_size",
      micro_batch,
      f"a micro-batch does not divide by the {shards} batch shards (mesh axes {axes})",
      f"set micro_batch_size to a multiple of {shards}, or shrink mesh.data/mesh.fsdp",
    )


def make_global_batch(host_batch, sharding: NamedSharding, global_batch: int):
  """One global array per field from this host's rows ({'inputs','targets'} [b, T],
  b = global_batch / process_count): every host passes only its own share."""

  def make(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch,) + x.shape[1:])

  return jax.tree.map(make, host_batch)


# ----------------------------------------------------------------------------
# Jit with shardings.
# ----------------------------------------------------------------------------


def sharded_jit(
  fn: Callable,
  mesh: Mesh,
  rules,
  in_shardings,
  out_shardings,
  donate_argnums=(),
  static_argnums=(),
):
  """jax.jit of `fn` with explicit shardings, traced under the mesh and the rules so
  that `nn.with_logical_constraint` inside the model resolves logical names."""

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return jax.jit(
    traced,
    in_shardings=in_shardings,
    out_shardings=out_shardings,
    donate_argnums=donate_argnums,
    static_argnums=static_argnums,
  )


def create_sharded(init_fn: Callable, mesh: Mesh, rules, shardings, *args):
  """Runs `init_fn(*args)` (e.g. train-state creation from an rng) under jit with
  `out_shardings`, so every array is born sharded; no full copy on one device."""
  return sharded_jit(init_fn, mesh, rules, None, shardings)(*args)


def interleave_micro_batches(batch, num_micro: int):
  """Reorders the rows of every [B, ...] array so that a contiguous split into
  `num_micro` micro-batches (what train_step does) takes micro-batch m from rows
  m, m + M, m + 2M, ... of the original batch.

  The batch is split over devices in contiguous blocks of rows; a contiguous
  micro-batch would live on a few devices only, and XLA would gather it and repeat
  its work on every device. Strided micro-batches keep each device's share local:
  every device works on its own rows of every micro-batch. The weighted gradient sum
  over micro-batches does not depend on which rows form which micro-batch.
  """
  if num_micro == 1:
    return batch

  def reorder(x):
    micro = x.shape[0] // num_micro
    return x.reshape((micro, num_micro) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

  return jax.tree.map(reorder, batch)


def jit_train_step(
  step_fn: Callable,
  mesh: Mesh,
  rules,
  state_shardings_,
  batch_sharding_,
  num_micro: int = 1,
  donate: bool = True,
):
  """`step_fn(state, batch) -> (state, metrics)` compiled with the state sharded as
  `state_shardings_`, the batch as `batch_sharding_`, metrics replicated, and the input
  state donated (its buffers are reused for the output). `num_micro` is the step's
  micro-batch count (see interleave_micro_batches)."""

  def step(state, batch):
    return step_fn(state, interleave_micro_batches(batch, num_micro))

  return sharded_jit(
    step,
    mesh,
    rules,
    in_shardings=(state_shardings_, batch_sharding_),
    out_shardings=(state_shardings_, replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )


def jit_eval_step(eval_fn: Callable, mesh: Mesh, rules, param_shardings, batch_sharding_):
  """`eval_fn(params, batch, token_bytes_V) -> sums` with params sharded, the batch
  split, the byte table and the sums replicated."""
  return sharded_jit(
    eval_fn,
    mesh,
    rules,
    in_shardings=(param_shardings, batch_sharding_, replicated(mesh)),
    out_shardings=replicated(mesh),
  )
