"""Checkpointing on Orbax, one module per job.

* `manager`: `Checkpointer`, the Orbax CheckpointManager over `<workdir>/checkpoints`
  (async saves, keep-N, the save interval and preemption policy) with what Orbax lacks:
  verified restores, the free-space check, read-only mode for readers;
* `record`: what each checkpoint records to be verified against (tokenizer, checksums),
  kept in Orbax's per-step custom metadata;
* `integrity`: checksums of the state's arrays and of JSON items;
* `guard`: refuses a workdir whose checkpoints were written by a model of another shape
  or with another tokenizer;
* `preemption`: when the train loop saves and stops (SIGTERM on one host, JAX's
  preemption sync point on several);
* `messages`: the errors and every message they carry.

Layout: `<workdir>/checkpoints/<step>/` holds the items `state` (the train state),
`config` (the run's config as JSON, read by the guard) and any extra items the caller
adds (the data iterator's state), and Orbax's `_CHECKPOINT_METADATA` with the record.
"""

from flt_jax.train.checkpoint.guard import check_compatible, check_tokenizer
from flt_jax.train.checkpoint.manager import Checkpointer, ensure_writable_dir
from flt_jax.train.checkpoint.messages import (
  CheckpointError,
  CheckpointSaveError,
  CorruptCheckpointError,
)
from flt_jax.train.checkpoint.preemption import PreemptionHandler

__all__ = [
  "CheckpointError",
  "CheckpointSaveError",
  "Checkpointer",
  "CorruptCheckpointError",
  "PreemptionHandler",
  "check_compatible",
  "check_tokenizer",
  "ensure_writable_dir",
]
