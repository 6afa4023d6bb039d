"""Defaults and validation for the `config.data` section.

seq_len and batch size are not part of this section: seq_len comes from
config.model.seq_len and the per-host batch from the trainer.
"""

from __future__ import annotations

import ml_collections

from flt_jax.data import synthetic
from flt_jax.errors import config_error

SOURCES = ("stdlib", "multihop", "modarith", "text", "jsonl", "parquet", "tokens")
SYNTHETIC_SOURCES = ("multihop", "modarith")
FILE_SOURCES = ("text", "jsonl", "parquet", "tokens")
TOKENIZERS = ("bytes", "bpe", "file")
MODARITH_FORMS = ("chain", "nested")
MODARITH_OPS = "+-*"


def get_config() -> ml_collections.ConfigDict:
  """Defaults for config.data."""
  c = ml_collections.ConfigDict()
  # Where documents come from. 'stdlib' (embedded Python standard library
  # sources), 'multihop' / 'modarith' (embedded synthetic reasoning tasks),
  # 'text' / 'jsonl' / 'parquet' (local files), 'tokens' (pre-tokenised shards
  # written by `python -m flt_jax.data.prepare`, or 1-D .npy arrays).
  c.source = "stdlib"
  # Glob (comma-separated globs allowed, '**' recursive) for file sources;
  # '' for embedded sources.
  c.path = ""
  c.text_column = "text"  # field of JSONL objects / column of Parquet files
  c.tokenizer = "bytes"  # 'bytes' | 'bpe' (trained locally) | 'file'
  # 'file': path of a tokenizer.json. 'bpe': optional cache path of the trained
  # tokenizer.json ('' = keep it in memory only).
  c.tokenizer_path = ""
  c.bpe_vocab_size = 4096
  # BPE is trained on at most this many UTF-8 bytes of the training split.
  c.bpe_train_bytes = 2_000_000
  # Separator token for 'file' tokenizers; '' = detect a usual one
  # (<|endoftext|>, </s>, <|eos|>, <eos>, <|bos|>, <s>).
  c.eos_token = ""
  c.seed = 0
  c.shuffle = True
  # Packed rows are shuffled within windows of this many rows (train split), so a
  # batch mixes documents instead of holding consecutive pieces of one; 0 = off.
  c.shuffle_window_rows = 1024
  # File-level train/validation split (document-level when only one file).
  c.validation_fraction = 0.05
  c.num_workers = 0  # grain worker processes; 0 = in-process
  c.read_threads = 2  # grain threads that load + tokenise documents
  # Synthetic tasks: examples per split (generated lazily, deterministically).
  c.num_train_examples = 100_000
  c.num_validation_examples = 512
  # Synthetic tasks: train only on answer tokens (other targets carry no loss).
  c.loss_on_answer_only = True

  c.multihop = ml_collections.ConfigDict()
  c.multihop.num_nodes = 16  # size of the shuffled pointer table
  c.multihop.hops_min = 1
  c.multihop.hops_max = 4
  c.multihop.task_seed = 1234  # fixes the examples; data.seed only orders them

  c.modarith = ml_collections.ConfigDict()
  c.modarith.modulus = 23
  c.modarith.depth_min = 1
  c.modarith.depth_max = 4
  c.modarith.form = "chain"  # 'chain' of assignments or 'nested' expression
  c.modarith.ops = "+-*"
  c.modarith.task_seed = 1234
  return c


def stream_fields(data_config) -> dict:
  """The data settings that define the train stream and the layout of its saved iterator
  state, as they take effect ({'data.<field>': value}): a checkpoint's iterator state
  resumes only a pipeline with the same values. Not included: read_threads (the state
  does not depend on it), validation-only and target-only fields, and the tokenizer
  (checkpoints record and check its identity)."""
  d = data_config
  shuffle = bool(d.shuffle)
  out = {"source": d.source, "shuffle": shuffle, "num_workers": int(d.num_workers)}
  if shuffle:
    out["seed"] = int(d.seed)
  if d.source in SYNTHETIC_SOURCES:
    out["num_train_examples"] = int(d.num_train_examples)
    for k, v in d[d.source].items():
      out[f"{d.source}.{k}"] = v
  else:
    window = int(d.shuffle_window_rows)
    out["shuffle_window_rows"] = window if shuffle and window > 1 else 0  # <= 1: off
    out["validation_fraction"] = float(d.validation_fraction)
    if d.source != "stdlib":
      out["path"] = d.path
    if d.source in ("jsonl", "parquet"):
      out["text_column"] = d.text_column
  return {f"data.{k}": v for k, v in out.items()}


def stream_changes(saved_data, data_config) -> list[tuple[str, object, object]]:
  """[(field, saved value, value now)] of `stream_fields` that differ; `saved_data` is
  the data section of a checkpoint's saved config (a dict; fields it lacks are
  skipped)."""
  saved = ml_collections.ConfigDict(get_config().to_dict())
  try:
    saved.update(dict(saved_data or {}))
  except (KeyError, AttributeError, TypeError):
    return []
  known = set(saved_data or {})
  before, now = stream_fields(saved), stream_fields(data_config)
  changes = []
  derived = ("data.seed", "data.shuffle_window_rows")  # follow data.shuffle
  for field, value in now.items():
    if field in derived and before.get("data.shuffle") != now["data.shuffle"]:
      continue
    top = field.split(".")[1]
    if top in known and field in before and before[field] != value:
      changes.append((field, before[field], value))
  return changes


def validate(data_config, *, seq_len: int) -> None:
  """Raises ConfigError naming the field, the bad value and the fix."""
  d = data_config

  def check(ok: bool, field: str, requirement: str, fix: str = "") -> None:
    if not ok:
      value = d
      for key in field.split("."):
        value = value[key]
      raise config_error(f"data.{field}", value, requirement, fix)

  if not isinstance(seq_len, int) or seq_len < 2:
    raise config_error(
      "model.seq_len",
      seq_len,
      "the data pipeline needs seq_len >= 2",
      "set config.model.seq_len to an integer >= 2",
    )
  check(d.source in SOURCES, "source", f"allowed values are {SOURCES}")
  check(d.tokenizer in TOKENIZERS, "tokenizer", f"allowed values are {TOKENIZERS}")
  check(
    not (d.source in FILE_SOURCES and not d.path),
    "path",
    f"data.source={d.source!r} needs a file glob",
    "set data.path='dir/*.ext' (or data.source='stdlib' for the embedded corpus)",
  )
  check(
    not (d.source in FILE_SOURCES + ("stdlib",) and d.tokenizer == "file" and not d.tokenizer_path),
    "tokenizer_path",
    "data.tokenizer='file' needs the path of a tokenizer.json",
    "set data.tokenizer_path, e.g. to one written by `python -m flt_jax.data.prepare "
    "train_tokenizer`",
  )
  check(
    d.tokenizer != "bpe" or 257 + 1 <= int(d.bpe_vocab_size) <= 1 << 20,
    "bpe_vocab_size",
    "must be in [258, 1048576] (256 byte symbols + separator + merges)",
  )
  check(int(d.bpe_train_bytes) > 0, "bpe_train_bytes", "must be > 0")
  check(0.0 <= float(d.validation_fraction) < 1.0, "validation_fraction", "must be in [0, 1)")
  check(
    int(d.shuffle_window_rows) >= 0,
    "shuffle_window_rows",
    "must be >= 0 (rows per shuffle window)",
    "use 0 to turn the row shuffle off",
  )
  check(int(d.num_workers) >= 0, "num_workers", "must be >= 0", "use 0 to read in-process")
  check(int(d.read_threads) >= 0, "read_threads", "must be >= 0")
  check(0 <= int(d.seed) < 2**32, "seed", "must be in [0, 2**32)")
  if d.source in SYNTHETIC_SOURCES:
    check(int(d.num_train_examples) >= 1, "num_train_examples", "must be >= 1")
    check(int(d.num_validation_examples) >= 0, "num_validation_examples", "must be >= 0")
  m = d.multihop
  if d.source == "multihop":
    check(int(m.num_nodes) >= 2, "multihop.num_nodes", "must be >= 2")
    check(int(m.hops_min) >= 1, "multihop.hops_min", "must be >= 1")
    check(
      int(m.hops_max) >= int(m.hops_min),
      "multihop.hops_max",
      f"must be >= data.multihop.hops_min={m.hops_min}",
    )
  a = d.modarith
  if d.source == "modarith":
    check(int(a.modulus) >= 2, "modarith.modulus", "must be >= 2")
    check(int(a.depth_min) >= 1, "modarith.depth_min", "must be >= 1")
    check(
      int(a.depth_max) >= int(a.depth_min),
      "modarith.depth_max",
      f"must be >= data.modarith.depth_min={a.depth_min}",
    )
    check(a.form in MODARITH_FORMS, "modarith.form", f"allowed values are {MODARITH_FORMS}")
    check(
      bool(a.ops) and all(o in MODARITH_OPS for o in a.ops),
      "modarith.ops",
      f"use a non-empty string of operators from {MODARITH_OPS!r}",
    )
  if d.source in SYNTHETIC_SOURCES:
    need = synthetic.max_example_length(d)
    if need > seq_len + 1:
      knob = (
        "data.multihop.num_nodes / hops_max"
        if d.source == "multihop"
        else "data.modarith.depth_max"
      )
      raise config_error(
        "model.seq_len",
        seq_len,
        f"too short for data.source={d.source!r}: the longest example has {need} tokens "
        "(with separator) and must fit in seq_len + 1",
        f"set config.model.seq_len >= {need - 1} or reduce {knob}",
      )
