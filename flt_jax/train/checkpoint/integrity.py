"""Checksums of a saved state, so that damaged bytes are found on restore.

Orbax writes the arrays without a checksum of their own, so one flipped byte in the
state's files restores silently (as a NaN or a wrong weight). At every save the
Checkpointer records two 32-bit sums per array, computed on the devices where the
array lives (one jitted reduction over the state; only the sums reach the host), and
on restore it computes them again over the restored arrays and compares.

Per array, with w the array's bits as uint32 words (16- and 8-bit types widened, bool
as 0/1, 64-bit types as two words) and i the row-major index of each word:

  plain    = sum(w)            mod 2**32
  weighted = sum(w * (2i + 1)) mod 2**32

Integer sums do not depend on the order of the reduction, so the figures are the same
whatever mesh or sharding the state is saved from or restored onto, and on every host
of a multi-host run (the result is a replicated scalar). Any change of a single word
changes `plain`; `weighted` also catches words swapped between positions. This finds
damage, not tampering.

JSON items saved beside the state (the data iterator's position) get a SHA-256 of
their canonical JSON (`json_checksum`), compared with the state restored from them.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FORMAT = "u32-sum-weighted-v1"
_MASK = 0xFFFFFFFF


def _words(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = np.dtype(x.dtype).itemsize * 8
  if bits == 32:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if bits in (8, 16):
    unsigned = jnp.uint8 if bits == 8 else jnp.uint16
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if bits == 64:  # [..., 2] words
    return lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _sums(x) -> tuple[jax.Array, jax.Array]:
  w = _words(jnp.asarray(x))
  # Row-major word index from per-dimension iotas (no reshape: a sharded array stays
  # where it is and XLA fuses the iotas into the reduction).
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, dim) * jnp.uint32(stride & _MASK)
    stride *= w.shape[dim]
  plain = jnp.sum(w, dtype=jnp.uint32)
  weighted = jnp.sum(w * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  return plain, weighted


@jax.jit
def _tree_sums(leaves):
  return [_sums(x) for x in leaves]


def _host_int(a) -> int:
  # A replicated scalar: every device (every host) holds the whole value.
  if isinstance(a, jax.Array):
    return int(np.asarray(a.addressable_data(0)))
  return int(a)


def checksums(tree) -> dict[str, list[int]]:
  """{key path: [plain, weighted]} of every array leaf of `tree` (see module doc)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  sums = _tree_sums([leaf for _, leaf in flat])
  return {p: [_host_int(a), _host_int(b)] for p, (a, b) in zip(paths, sums)}


def mismatches(saved: dict, restored: dict) -> list[str]:
  """Key paths whose sums differ (paths present in both)."""
  return [p for p, v in saved.items() if p in restored and list(v) != list(restored[p])]


def json_checksum(value) -> str:
  """SHA-256 of `value` as canonical JSON (sorted keys): the same for a state and its
  round trip through a JSON file."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()
