"""Defaults and validation for the `config.data` section.

seq_len and batch size are not part of this section: seq_len comes from
config.model.seq_len and the per-host batch from the trainer.
"""

from __future__ import annotations

import ml_collections

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
  # Synthetic tasks: train only on answer tokens (targets elsewhere = -1).
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


def _fail(field, value, fix):
  raise ValueError(f"data.{field}={value!r} is invalid: {fix}")


def validate(data_config, *, seq_len: int) -> None:
  """Raises ValueError naming the field, the bad value and the fix."""
  d = data_config
  if not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(
      f"seq_len={seq_len!r} is invalid: the data pipeline needs seq_len >= 2 "
      "(set config.model.seq_len to an integer >= 2)."
    )
  if d.source not in SOURCES:
    _fail("source", d.source, f"allowed values are {SOURCES}")
  if d.tokenizer not in TOKENIZERS:
    _fail("tokenizer", d.tokenizer, f"allowed values are {TOKENIZERS}")
  if d.source in FILE_SOURCES and not d.path:
    _fail(
      "path",
      d.path,
      f"data.source={d.source!r} needs a file glob in "
      "data.path (or set data.source='stdlib' for the embedded corpus)",
    )
  if d.source in FILE_SOURCES + ("stdlib",) and d.tokenizer == "file" and not d.tokenizer_path:
    _fail(
      "tokenizer_path", d.tokenizer_path, "data.tokenizer='file' needs the path of a tokenizer.json"
    )
  if d.tokenizer == "bpe" and not 257 + 1 <= int(d.bpe_vocab_size) <= 1 << 20:
    _fail(
      "bpe_vocab_size",
      d.bpe_vocab_size,
      "must be in [258, 1048576] (256 byte symbols + separator + merges)",
    )
  if int(d.bpe_train_bytes) <= 0:
    _fail("bpe_train_bytes", d.bpe_train_bytes, "must be > 0")
  if not 0.0 <= float(d.validation_fraction) < 1.0:
    _fail("validation_fraction", d.validation_fraction, "must be in [0, 1)")
  if int(d.shuffle_window_rows) < 0:
    _fail(
      "shuffle_window_rows",
      d.shuffle_window_rows,
      "must be >= 0 (rows per shuffle window; 0 = no row shuffle)",
    )
  if int(d.num_workers) < 0:
    _fail("num_workers", d.num_workers, "must be >= 0 (0 = in-process)")
  if int(d.read_threads) < 0:
    _fail("read_threads", d.read_threads, "must be >= 0")
  if not 0 <= int(d.seed) < 2**32:
    _fail("seed", d.seed, "must be in [0, 2**32)")
  if d.source in SYNTHETIC_SOURCES:
    if int(d.num_train_examples) < 1:
      _fail("num_train_examples", d.num_train_examples, "must be >= 1")
    if int(d.num_validation_examples) < 0:
      _fail("num_validation_examples", d.num_validation_examples, "must be >= 0")
  m = d.multihop
  if d.source == "multihop":
    if int(m.num_nodes) < 2:
      _fail("multihop.num_nodes", m.num_nodes, "must be >= 2")
    if int(m.hops_min) < 1:
      _fail("multihop.hops_min", m.hops_min, "must be >= 1")
    if int(m.hops_max) < int(m.hops_min):
      _fail("multihop.hops_max", m.hops_max, f"must be >= data.multihop.hops_min={m.hops_min}")
  a = d.modarith
  if d.source == "modarith":
    if int(a.modulus) < 2:
      _fail("modarith.modulus", a.modulus, "must be >= 2")
    if int(a.depth_min) < 1:
      _fail("modarith.depth_min", a.depth_min, "must be >= 1")
    if int(a.depth_max) < int(a.depth_min):
      _fail("modarith.depth_max", a.depth_max, f"must be >= data.modarith.depth_min={a.depth_min}")
    if a.form not in MODARITH_FORMS:
      _fail("modarith.form", a.form, f"allowed values are {MODARITH_FORMS}")
    if not a.ops or any(o not in MODARITH_OPS for o in a.ops):
      _fail("modarith.ops", a.ops, f"use a non-empty string of operators from {MODARITH_OPS!r}")
  if d.source in SYNTHETIC_SOURCES:
    from flt_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    need = synthetic.max_example_length(d)
    if need > seq_len + 1:
      knob = (
        "data.multihop.num_nodes / hops_max"
        if d.source == "multihop"
        else "data.modarith.depth_max"
      )
      raise ValueError(
        f"seq_len={seq_len} is too short for data.source={d.source!r}: the "
        f"longest example has {need} tokens (with separator) and must fit "
        f"in seq_len + 1; set config.model.seq_len >= {need - 1} or reduce "
        f"{knob}."
      )
