"""grain input pipelines: shuffle, tokenise, pack, batch, shard over hosts.

Text / token sources:
  units (docs, Parquet row groups) -> host shard units[i::n] -> seeded
  shuffle (reshuffled every epoch) -> repeat -> load + tokenise (+ separator)
  -> flatten to documents -> concat-then-split packing into rows of
  seq_len + 1 with segment ids -> (train) windowed row shuffle ->
  inputs/targets -> batch.
Synthetic tasks: example index -> host shard -> shuffle -> repeat -> one
  example per row, padded -> batch.

Each batch is a dict of numpy int32 arrays [B, seq_len]:
  inputs, targets (next token; IGNORE_LABEL = no loss: padding, a target in another
  document, or a non-answer position when loss_on_answer_only), segment_ids
  (1, 2, ... per document within the row; PAD_SEGMENT = padding), positions (position
  within the document piece), and for synthetic tasks answer_mask (1 where the
  target is an answer token).
The iterator is a grain DatasetIterator: get_state()/set_state() are small
JSON-able dicts; `checkpoint_args_save/restore` put it into Orbax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from flt_jax.constants import IGNORE_LABEL, PAD_SEGMENT
from flt_jax.data import config as config_lib
from flt_jax.data import sources, synthetic
from flt_jax.data import tokenizers as tokenizers_lib
from flt_jax.errors import config_error


# ------------------------------------------------------------ element steps
class _LoadTokenize:
  """unit -> list of int32 token arrays, each document ending in eos."""

  def __init__(self, load, tokenizer, kind):
    self.load, self.tokenizer, self.kind = load, tokenizer, kind

  def __call__(self, unit):
    docs = self.load(unit)
    if self.kind == "tokens":
      return docs
    eos = np.array([self.tokenizer.eos_id], np.int32)
    return [np.concatenate([self.tokenizer.encode_array(t), eos]) for t in docs]


class _Documents(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 20

  def flat_map(self, element):
    return [{"tokens": doc} for doc in element]


def _packed_to_row(el):
  tok = np.asarray(el["tokens"], np.int32)
  seg = np.asarray(el["tokens_segment_ids"], np.int32)
  pos = np.asarray(el["tokens_positions"], np.int32)
  targets = tok[1:].copy()
  targets[(seg[1:] != seg[:-1]) | (seg[:-1] == PAD_SEGMENT)] = IGNORE_LABEL
  return {"inputs": tok[:-1], "targets": targets, "segment_ids": seg[:-1], "positions": pos[:-1]}


class _PadBatch:
  """Stacks rows; pads a short final batch with empty rows (no targets, padding segment)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, rows):
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    short = self.batch_size - len(rows)
    if short > 0:
      for k, v in out.items():
        fill = IGNORE_LABEL if k == "targets" else PAD_SEGMENT if k == "segment_ids" else 0
        pad = np.full((short,) + v.shape[1:], fill, v.dtype)
        out[k] = np.concatenate([v, pad])
    return out


class _ExampleRow:
  def __init__(self, task, split, seq_len, loss_on_answer_only):
    self.task, self.split = task, split
    self.seq_len, self.loss_on_answer_only = seq_len, loss_on_answer_only

  def __call__(self, index):
    ex = self.task.example(self.split, int(index))
    return synthetic.example_to_row(ex, self.seq_len, self.loss_on_answer_only)


# ------------------------------------------ JSON-safe packing state wrapper
class _TupleSlicesIterator(grain.DatasetIterator):
  """Delegates to grain's concat-then-split iterator, restoring the tuples of
  its `remainder_slices` that a JSON round trip (as grain's Orbax handler
  does) turns into lists; grain 0.2.18 compares them with a tuple sentinel
  and would otherwise drop a document after restoring such a state."""

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    state = dict(state)
    state["remainder_slices"] = {
      k: tuple(int(x) for x in v) for k, v in state["remainder_slices"].items()
    }
    self._parent.set_state(state)


class _TupleSlices(grain.IterDataset):
  def __iter__(self):
    return _TupleSlicesIterator(self._parent.__iter__())


# ------------------------------------------------- exactly-n-batches wrapper
class _ExactCountIterator(grain.DatasetIterator):
  def __init__(self, parent, count, template):
    super().__init__(parent)
    self._count, self._template, self._emitted = count, template, 0
    self._parent_done = False

  def __next__(self):
    if self._emitted >= self._count:
      raise StopIteration
    batch = None
    if not self._parent_done:
      try:
        batch = next(self._parent)
      except StopIteration:
        self._parent_done = True
    if batch is None:
      batch = {k: v.copy() for k, v in self._template.items()}
    self._emitted += 1
    return batch

  def get_state(self):
    return {
      "parent": self._parent.get_state(),
      "emitted": self._emitted,
      "parent_done": self._parent_done,
    }

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._emitted = int(state["emitted"])
    self._parent_done = bool(state["parent_done"])


class _ExactCount(grain.IterDataset):
  """Yields exactly `count` batches: truncates, or pads with empty batches
  (no targets, padding segment) - keeps multi-host eval in lockstep."""

  def __init__(self, parent, count, template):
    super().__init__(parent)
    self._count, self._template = count, template

  def __iter__(self):
    return _ExactCountIterator(self._parent.__iter__(), self._count, self._template)


# ------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class Pipeline:
  """A configured input pipeline. `iter(pipeline)` -> grain DatasetIterator."""

  dataset: Any  # grain.IterDataset of batches
  tokenizer: tokenizers_lib.Tokenizer
  split: str
  seq_len: int
  batch_size: int
  description: str = ""

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def __iter__(self):
    return iter(self.dataset)


def _empty_batch(batch_size, seq_len, synthetic_task):
  z = np.zeros([batch_size, seq_len], np.int32)
  out = {
    "inputs": z,
    "targets": np.full_like(z, IGNORE_LABEL),
    "segment_ids": np.full_like(z, PAD_SEGMENT),
    "positions": z,
  }
  if synthetic_task:
    out["answer_mask"] = z
  return out


def _check_args(split, seq_len, process_index, process_count, num_epochs):
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r} is invalid: use 'train' or 'validation'")
  if not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(
      f"seq_len={seq_len!r} is invalid: the data pipeline "
      "needs seq_len >= 2 (set config.model.seq_len >= 2)"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if num_epochs is None and split == "validation":
    num_epochs = 1
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None (forever)")
  return num_epochs


def make_tokenizer(data_config) -> tokenizers_lib.Tokenizer:
  """The tokenizer that `data_config` asks for.

  Synthetic sources use their own symbol tokenizer; 'bpe' is trained on (a
  budgeted, deterministic sample of) the training split of the configured text
  source.
  """
  d = data_config
  if d.source in config_lib.SYNTHETIC_SOURCES:
    return synthetic.make_task(d).tokenizer
  if d.tokenizer == "bytes":
    return tokenizers_lib.BytesTokenizer()
  if d.tokenizer == "file":
    return tokenizers_lib.load_tokenizer_file(d.tokenizer_path, d.eos_token)
  if d.tokenizer == "bpe" and d.source == "tokens":
    raise config_error(
      "data.tokenizer",
      d.tokenizer,
      "a BPE cannot be trained from pre-tokenised shards (data.source='tokens')",
      "use data.tokenizer='file' with the tokenizer.json the shards were made with",
    )
  if d.tokenizer == "bpe":
    texts = sources.training_texts(d, int(d.bpe_train_bytes))
    return tokenizers_lib.bpe_from_texts(
      texts,
      int(d.bpe_vocab_size),
      d.tokenizer_path,
      "config.data.bpe_train_bytes",
      d.bpe_train_bytes,
    )
  raise config_error("data.tokenizer", d.tokenizer, f"allowed values are {config_lib.TOKENIZERS}")


def _units(d, split, tokenizer):
  """(MapDataset of units, tokenizer, split-or-task, description)."""
  if d.source in config_lib.SYNTHETIC_SOURCES:
    task = synthetic.make_task(d)
    n = int(d.num_train_examples if split == "train" else d.num_validation_examples)
    if n < 1:
      raise ValueError(
        f"the {split} split of data.source={d.source!r} is "
        "empty; raise data.num_validation_examples"
      )
    return (grain.MapDataset.range(n), task.tokenizer, task, f"{d.source}:{split} {n} examples")
  if tokenizer is None:
    tokenizer = make_tokenizer(d)
  sp = sources.get_split(d, split, tokenizer)
  return grain.MapDataset.source(sp.units), tokenizer, sp, sp.description


def _ordered_units(d, units, split, process_index, process_count, num_epochs, description):
  units = units[process_index::process_count]
  if len(units) == 0:
    raise ValueError(
      f"host {process_index} of {process_count} gets no data from the "
      f"{split} split ({description}); use fewer hosts or more data"
    )
  if bool(d.shuffle) and split == "train":
    units = units.shuffle(int(d.seed))
  return units.repeat(num_epochs)


# Reading ahead costs about this many bytes per token of each unit a read thread holds
# (its text, ids and copies: 18 measured for a one-line 10 MB text file), and may use at
# most READ_AHEAD_BYTES; a larger unit is read when needed, with no thread reading ahead.
# (A corpus that is one 50 MB line held 2.6 GB with two threads.)
READ_BYTES_PER_TOKEN = 20
READ_AHEAD_BYTES = 512 * 2**20


def read_ahead(threads: int, max_unit_tokens: int = 0) -> tuple[int, int]:
  """(read threads, units kept ready) for grain: `threads` threads with 4 units each, as
  many threads as READ_AHEAD_BYTES holds for units of `max_unit_tokens` tokens, none when
  not even one fits. Only memory and speed depend on them, not the data or the saved
  iterator state."""
  fit = READ_AHEAD_BYTES // max(READ_BYTES_PER_TOKEN * max_unit_tokens, 1)
  threads = max(0, min(threads, fit))
  return threads, 4 * threads


def _read_options(d, max_unit_tokens: int = 0):
  threads, prefetch = read_ahead(int(d.read_threads), max_unit_tokens)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


def make_packed_rows(
  data_config,
  *,
  split: str,
  seq_len: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  tokenizer=None,
):
  """(grain IterDataset of packed rows, tokenizer) for text / token sources.

  A row is {'tokens', 'tokens_segment_ids', 'tokens_positions'}, each int
  [seq_len + 1]: documents (each followed by the separator) concatenated in
  order and cut every seq_len + 1 tokens; only the last row of a finite pass
  is padded (segment id 0).
  """
  d = data_config
  num_epochs = _check_args(split, seq_len, process_index, process_count, num_epochs)
  if d.source in config_lib.SYNTHETIC_SOURCES:
    raise ValueError("synthetic tasks are not packed (one example per row); use make_pipeline")
  units, tokenizer, sp, description = _units(d, split, tokenizer)
  units = _ordered_units(d, units, split, process_index, process_count, num_epochs, description)
  ds = units.map(_LoadTokenize(sp.load, tokenizer, sp.kind))
  ds = ds.to_iter_dataset(_read_options(d, sp.max_unit_tokens))
  ds = grain.experimental.FlatMapIterDataset(ds, _Documents())
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  return _TupleSlices(ds), tokenizer, description


def make_pipeline(
  data_config,
  *,
  split: str,
  seq_len: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  tokenizer=None,
  num_batches: int | None = None,
) -> Pipeline:
  """Builds the pipeline of one split for one host.

  Args:
    data_config: the config.data section (see data/config.py).
    split: 'train' or 'validation'.
    seq_len: model sequence length; rows hold seq_len + 1 tokens.
    batch_size: per-host batch size.
    process_index / process_count: this host and the number of hosts; hosts
      get disjoint slices (units[i::n]) of the split.
    num_epochs: None = repeat forever for 'train', one pass for 'validation'.
    tokenizer: reuse an already built tokenizer (else make_tokenizer).
    num_batches: if set, yield exactly this many batches (truncate, or pad with
      empty batches): use it for multi-host evaluation.
  """
  d = data_config
  config_lib.validate(d, seq_len=seq_len)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
  is_synthetic = d.source in config_lib.SYNTHETIC_SOURCES
  if is_synthetic:
    num_epochs = _check_args(split, seq_len, process_index, process_count, num_epochs)
    units, tokenizer, task, description = _units(d, split, tokenizer)
    units = _ordered_units(d, units, split, process_index, process_count, num_epochs, description)
    ds = units.map(_ExampleRow(task, split, seq_len, bool(d.loss_on_answer_only)))
    ds = ds.to_iter_dataset(_read_options(d))
  else:
    ds, tokenizer, description = make_packed_rows(
      d,
      split=split,
      seq_len=seq_len,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      tokenizer=tokenizer,
    )
    if split == "train" and bool(d.shuffle) and int(d.shuffle_window_rows) > 1:
      ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=int(d.shuffle_window_rows), seed=int(d.seed)
      )
    ds = ds.map(_packed_to_row)
  ds = ds.batch(batch_size, batch_fn=_PadBatch(batch_size))
  if num_batches is not None:
    ds = _ExactCount(ds, int(num_batches), _empty_batch(batch_size, seq_len, is_synthetic))
  if int(d.num_workers) > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  return Pipeline(
    dataset=ds,
    tokenizer=tokenizer,
    split=split,
    seq_len=seq_len,
    batch_size=batch_size,
    description=description,
  )


# ------------------------------------------------------------ checkpointing
def checkpoint_args_save(iterator):
  """Orbax args that save a grain iterator's state; put them into
  ocp.args.Composite(..., data=checkpoint_args_save(it))."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_args_restore(iterator):
  """Orbax args that restore the state into `iterator` in place."""
  return grain.checkpoint.CheckpointRestore(iterator)
