"""The device mesh: named axes (data, fsdp, tensor) from `config.mesh`.

Within a slice the devices are laid out by `mesh_utils.create_device_mesh`, which
follows the physical TPU torus so that the most communication-heavy axis (tensor) runs
over the nearest chips. Across slices (multi-slice TPU) or hosts (a GPU cluster),
`create_hybrid_device_mesh` puts the `dcn_*` factors on the slower network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from flt_jax.errors import ConfigError, config_error
from flt_jax.parallel.config import DCN_FIELDS, MESH_AXES


def _num_granules(devices: Sequence) -> tuple[int, bool]:
  """(number of DCN granules, by_process): TPU slices, or processes (hosts) for GPUs and
  for devices without a slice index. GPUs report slice_index 0 on every host (the
  compile-only ones do), so for them the host is the granule."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  is_gpu = devices[0].platform in ("gpu", "cuda", "rocm")
  if None not in slices and not is_gpu:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def resolve_shape(mesh_config, num_devices: int, num_granules: int = 1):
  """(ici_sizes, dcn_sizes): per-axis sizes within a slice and across slices.

  `num_granules` is the number of slices (or hosts) the devices span; the `dcn_*`
  sizes must multiply to it, and the in-slice sizes to the devices of one slice.
  """
  dcn = tuple(int(mesh_config[field]) for field in DCN_FIELDS)
  if math.prod(dcn) != num_granules:
    raise config_error(
      "mesh." + "/".join(DCN_FIELDS),
      dcn,
      f"the cross-slice sizes multiply to {math.prod(dcn)} but the devices span "
      f"{num_granules} slice(s)/host(s)",
      f"make dcn_data * dcn_fsdp * dcn_tensor = {num_granules}",
    )
  if num_devices % num_granules:
    raise ConfigError(f"{num_devices} devices do not split evenly into {num_granules} slices")
  per_slice = num_devices // num_granules
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_slice % known:
      raise config_error(
        "mesh",
        dict(zip(MESH_AXES, sizes)),
        f"the fixed sizes multiply to {known}, which does not divide the {per_slice} "
        "devices per slice",
        f"choose sizes whose product divides {per_slice}",
      )
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice:
    raise config_error(
      "mesh",
      dict(zip(MESH_AXES, sizes)),
      f"data * fsdp * tensor = {math.prod(sizes)} but there are {per_slice} devices "
      + ("per slice" if num_granules > 1 else "")
      + f" ({num_devices} in all)",
      f"make the sizes multiply to {per_slice}, or set one of them to -1",
    )
  return tuple(sizes), dcn


def make_mesh(mesh_config, devices: Sequence | None = None) -> Mesh:
  """A Mesh over `devices` (default: all of them) with axes ('data', 'fsdp', 'tensor').

  The axes are of type Auto: XLA propagates shardings from the jit arguments and the
  logical constraints, as MaxText does.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_granules, by_process = _num_granules(devices)
  dcn_product = math.prod(int(mesh_config[field]) for field in DCN_FIELDS)
  if dcn_product == 1 and num_granules > 1:
    if not by_process:
      raise config_error(
        "mesh.dcn_data",
        1,
        f"the devices span {num_granules} TPU slices but every dcn_* size is 1",
        f"split the slices over the data-centre network, e.g. mesh.dcn_data={num_granules}",
      )
    num_granules = 1  # several hosts of one GPU cluster: lay every device out as one mesh
  ici, dcn = resolve_shape(mesh_config, len(devices), num_granules)
  split = bool(mesh_config.allow_split_physical_axes)
  try:
    if num_granules > 1:
      device_array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=split
      )
    elif len(devices) == 1:
      device_array = np.asarray(devices).reshape(ici)
    else:
      device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=split)
  except NotImplementedError as e:  # a size the physical torus cannot host as whole axes
    raise config_error(
      "mesh",
      dict(zip(MESH_AXES, ici)),
      f"does not map onto the physical TPU axes ({e})",
      "choose sizes that are products of whole physical axes, or set "
      "config.mesh.allow_split_physical_axes=True",
    ) from e
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
  """`data=2 fsdp=2 tensor=2 (8 devices, cpu)` for logs."""
  sizes = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  device = mesh.devices.flat[0]
  return f"{sizes} ({mesh.devices.size} devices, {getattr(device, 'device_kind', device.platform)})"
