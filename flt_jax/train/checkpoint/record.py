"""The record saved with every checkpoint: what `restore` verifies it against.

  {"tokenizer": Tokenizer.identity() or None,
   "checksum_format": integrity.FORMAT,
   "checksums": {key path: [plain, weighted]},            the state's arrays
   "item_checksums": {item name: [sha256 per process]}}   JSON items (the data position)

It is kept in Orbax's per-step custom metadata (`<step>/_CHECKPOINT_METADATA`, under
KEY), written by the primary host; the arrays' sums are the same on every host, and
each host's data position is gathered so that every host checks its own. Checkpoints
written before kept it as a JSON item (LEGACY_ITEM) whose `item_checksums` held process
0's sha256 alone; both forms are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flt_jax.train.checkpoint import integrity

KEY = "flt_record"
LEGACY_ITEM = "record"


def _per_process(checksum: str) -> list[str]:
  """Every process's sha256 (hex), in process order; collective on several hosts."""
  if jax.process_count() == 1:
    return [checksum]
  mine = np.frombuffer(bytes.fromhex(checksum), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [bytes(row).hex() for row in every]


def build(
  state, tokenizer: Mapping[str, Any] | None, extra_states: Mapping[str, Any] | None
) -> dict:
  """The record of a save of `state` and the JSON-able `extra_states` ({item name: the
  content saved}); every host calls it at the same save."""
  return {
    "tokenizer": dict(tokenizer) if tokenizer is not None else None,
    "checksum_format": integrity.FORMAT,
    "checksums": integrity.checksums(state),
    "item_checksums": {
      name: _per_process(integrity.json_checksum(value))
      for name, value in sorted((extra_states or {}).items())
    },
  }


def item_checksum(record: Mapping | None, name: str) -> str | None:
  """This process's recorded sha256 of item `name`, or None where none was recorded (an
  older checkpoint, or another process count)."""
  saved = ((record or {}).get("item_checksums") or {}).get(name)
  if isinstance(saved, str):  # the legacy item: process 0's alone
    return saved if jax.process_index() == 0 else None
  if isinstance(saved, list) and len(saved) == jax.process_count():
    return saved[jax.process_index()]
  return None
