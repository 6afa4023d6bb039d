"""Checkpointing, one module per job.

* `manager`: `Checkpointer`, the Orbax CheckpointManager over `<workdir>/checkpoints`
  (async saves, keep-N, the save interval, clear errors for unwritable or corrupt
  directories);
* `guard`: refuses a workdir whose checkpoints were written by a model of another shape
  or with another tokenizer;
* `integrity`: checksums of the state's arrays, written at save, verified on restore;
* `preemption`: turns SIGTERM into a flag the train loop polls, so it saves and exits.

Layout: `<workdir>/checkpoints/<step>/` holds the items `state` (the train state),
`config` (the run's config as JSON, read by the guard), `record` (JSON: the tokenizer's
identity and the state's checksums) and any extra items the caller adds (the data
iterator's state).
"""

from flt_jax.train.checkpoint.guard import check_compatible, check_tokenizer
from flt_jax.train.checkpoint.manager import (
  Checkpointer,
  CheckpointError,
  CheckpointSaveError,
  CorruptCheckpointError,
  ensure_writable_dir,
  read_saved_config,
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
  "read_saved_config",
]
