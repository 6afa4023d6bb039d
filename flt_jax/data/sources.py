"""Document sources: embedded stdlib text, local text / JSONL / Parquet files
and pre-tokenised shards, each with a deterministic train/validation split.

A split is a list of *units* plus a loader `load(unit) -> list[doc]`, where a
doc is a str (to be tokenised) or an int array of token ids that already ends
with the separator. Units are what gets shuffled and sharded over hosts: one
document for in-memory text, a row group for Parquet, one document (a slice of
a memory-mapped shard) for token shards.

Split rule: with >= 2 files, a file goes to validation iff crc32 of its path
(relative to the common root) falls below validation_fraction (at least one
file each side); with a single file the same rule is applied per document
(per row group for Parquet); a single file holding one unit (one text file, one
JSONL record, one Parquet row group, one token document) is split by rows: its
last validation_fraction of lines / rows / tokens is the validation split.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from flt_jax.errors import config_error

# ---------------------------------------------------------------- shard format
# A token shard (.bin): a 256-byte header of 32 little-endian int64
# [MAGIC, VERSION, itemsize (2 | 4), num_tokens, vocab_size, eos_id, num_docs,
# 0...] followed by num_tokens uint16/uint32 ids. Documents end with eos_id.
SHARD_MAGIC = 0x464C544A544F4B31  # 'FLTJTOK1'
SHARD_VERSION = 1
HEADER_INTS = 32


def write_token_shard(
  path: str, tokens: np.ndarray, *, vocab_size: int, eos_id: int, num_docs: int
) -> None:
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"token ids must be in [0, {vocab_size}) to write {path}")
  dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
  header = np.zeros([HEADER_INTS], "<i8")
  header[:7] = [
    SHARD_MAGIC,
    SHARD_VERSION,
    np.dtype(dtype).itemsize,
    tokens.size,
    vocab_size,
    eos_id,
    num_docs,
  ]
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes())


@functools.lru_cache(maxsize=256)
def read_token_shard(path: str) -> tuple[np.ndarray, dict[str, int]]:
  """Memory-maps a .bin shard or a 1-D .npy file. Returns (tokens, header)."""
  if path.endswith(".npy"):
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
      raise ValueError(
        f"{path}: a .npy token shard must be a 1-D integer "
        f"array, got shape {arr.shape} dtype {arr.dtype}"
      )
    return arr, {}
  header = np.fromfile(path, "<i8", count=HEADER_INTS)
  if header.size < HEADER_INTS or header[0] != SHARD_MAGIC:
    raise ValueError(
      f"{path} is not a flt_jax token shard (bad header); write "
      "shards with `python -m flt_jax.data.prepare tokenize` "
      "or use 1-D .npy files"
    )
  if header[1] != SHARD_VERSION or header[2] not in (2, 4):
    raise ValueError(f"{path}: unsupported shard version {header[1]} / itemsize {header[2]}")
  dtype = np.dtype("<u2" if header[2] == 2 else "<u4")
  arr = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 8, shape=(int(header[3]),))
  meta = dict(
    num_tokens=int(header[3]),
    vocab_size=int(header[4]),
    eos_id=int(header[5]),
    num_docs=int(header[6]),
  )
  return arr, meta


# --------------------------------------------------------------------- files
def resolve_files(path: str, *, source: str = "") -> list[str]:
  """Sorted files matching a (comma-separated, '**'-recursive) glob."""
  files = set()
  for pattern in [p.strip() for p in str(path).split(",") if p.strip()]:
    pattern = os.path.expanduser(pattern)
    files.update(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    hint = f" for data.source={source!r}" if source else ""
    raise config_error(
      "data.path",
      path,
      f"it matched no files{hint}",
      "check the glob (use '**' for subdirectories) or set data.source='stdlib' for the "
      "embedded corpus",
    )
  return sorted(files)


_STDLIB_SKIP_DIRS = {
  "site-packages",
  "dist-packages",
  "test",
  "tests",
  "idlelib",
  "turtledemo",
  "ensurepip",
  "pydoc_data",
  "__pycache__",
  "venv",
  "config-3",
  "lib-dynload",
}


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, tuple[str, ...]]:
  """(root, sorted *.py files) of this Python's standard library."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(
      d
      for d in dirnames
      if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-") and not d.startswith(".")
    )
    for name in filenames:
      if name.endswith(".py"):
        out.append(os.path.join(dirpath, name))
  if not out:
    raise ValueError(
      f"no standard-library *.py files found under {root}; "
      "use data.source=multihop/modarith or a local corpus"
    )
  return root, tuple(sorted(out))


def _in_validation(key: str, fraction: float) -> bool:
  return (zlib.crc32(key.encode("utf-8")) % 1_000_000) < fraction * 1_000_000


def split_keys(keys: list[str], fraction: float) -> tuple[list[int], list[int]]:
  """Deterministic (train, validation) index lists; both non-empty if
  fraction > 0 and len(keys) >= 2."""
  val = [i for i, k in enumerate(keys) if _in_validation(k, fraction)]
  if fraction > 0 and len(keys) >= 2:
    scores = [zlib.crc32(k.encode("utf-8")) for k in keys]
    if not val:
      val = [int(np.argmin(scores))]
    if len(val) == len(keys):
      val.remove(int(np.argmax(scores)))
  val_set = set(val)
  return [i for i in range(len(keys)) if i not in val_set], sorted(val_set)


def invalid_utf8_bytes(raw: bytes) -> int:
  """How many bytes of `raw` are not valid UTF-8 (each a lone surrogate when decoded with
  surrogateescape)."""
  return sum(1 for c in raw.decode("utf-8", "surrogateescape") if "\udc80" <= c <= "\udcff")


def decode_utf8(raw: bytes, where: str) -> str:
  """`raw` as text, invalid UTF-8 replaced by U+FFFD as before, with a warning naming
  `where` and how many bytes were replaced (a binary file, or text in another encoding,
  would otherwise train on replacement characters unnoticed)."""
  text = raw.decode("utf-8", "replace")
  if "\ufffd" in text:  # a replacement, or a U+FFFD the file holds: count the bad bytes
    bad = invalid_utf8_bytes(raw)
    if bad:
      logging.warning(
        "%s: %s of its %s bytes are not UTF-8 and become U+FFFD (a binary file, or text in "
        "another encoding? convert it with iconv, or leave it out of data.path)",
        where,
        f"{bad:,}",
        f"{len(raw):,}",
      )
  return text


@functools.lru_cache(maxsize=4096)
def _read_text(path: str, mtime: float) -> str:
  del mtime  # cache key only (and the warning is given once per file and version)
  with open(path, "rb") as f:
    return decode_utf8(f.read(), path)


def _text_docs(path: str) -> list[str]:
  text = _read_text(path, os.path.getmtime(path))
  return [text] if text else []


@functools.lru_cache(maxsize=1024)
def _jsonl_docs(path: str, column: str, mtime: float) -> tuple[str, ...]:
  del mtime
  out = []
  with open(path, "rb") as f:
    raw = f.read().removeprefix(codecs.BOM_UTF8)  # as json.loads(bytes) read it
  # Lines end at "\n" only, as in the file's bytes: JSON strings may hold U+2028 or U+0085.
  for lineno, line in enumerate(decode_utf8(raw, path).split("\n"), 1):
    line = line.strip()
    if not line:
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno} is not valid JSON ({e})") from e
    if not isinstance(obj, dict) or column not in obj:
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(
        f"{path}:{lineno} has no field data.text_column={column!r} "
        f"(fields: {keys}); set data.text_column"
      )
    if obj[column]:
      out.append(str(obj[column]))
  return tuple(out)


def _parquet_units(path: str, column: str) -> list[tuple[str, int]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  pf = pq.ParquetFile(path)
  names = pf.schema_arrow.names
  if column not in names:
    raise ValueError(
      f"{path} has no column data.text_column={column!r} (columns: "
      f"{names}); set data.text_column to the text column"
    )
  md = pf.metadata
  return [(path, g) for g in range(md.num_row_groups) if md.row_group(g).num_rows > 0]


def _load_parquet_row_group(unit, column: str) -> list[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  path, group, *rows = unit  # (path, group) or (path, group, first row, end row)
  table = pq.ParquetFile(path).read_row_group(group, columns=[column])
  if rows:
    table = table.slice(rows[0], rows[1] - rows[0])
  return [t for t in table.column(column).to_pylist() if t]


def _parquet_rows(unit) -> int:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  path, group = unit
  return pq.ParquetFile(path).metadata.row_group(group).num_rows


def _token_units(path: str, eos_id: int, vocab_size: int):
  arr, meta = read_token_shard(path)
  if meta and meta["vocab_size"] != vocab_size:
    raise ValueError(
      f"{path} was written with vocab_size={meta['vocab_size']} but the "
      f"configured tokenizer has vocab_size={vocab_size}; set data.tokenizer"
      " / data.tokenizer_path to the tokenizer the shards were made with"
    )
  if meta and meta["eos_id"] != eos_id:
    raise ValueError(
      f"{path} uses separator id {meta['eos_id']} but the "
      f"tokenizer separator is {eos_id}; use the same tokenizer"
    )
  if arr.size and int(arr.max()) >= vocab_size:
    raise ValueError(
      f"{path} contains token id {int(arr.max())}, beyond the vocabulary "
      f"[0, {vocab_size}); set data.tokenizer to the tokenizer the shards "
      "were made with"
    )
  ends = np.flatnonzero(np.asarray(arr) == eos_id) + 1
  if not ends.size or ends[-1] != arr.size:
    ends = np.append(ends, arr.size)
  starts = np.concatenate([[0], ends[:-1]])
  return [(path, int(s), int(e)) for s, e in zip(starts, ends) if e > s]


def _load_token_doc(unit) -> list[np.ndarray]:
  path, start, end = unit
  arr, _ = read_token_shard(path)
  return [np.asarray(arr[start:end], dtype=np.int32)]


# -------------------------------------------------------------------- memory
# Text and JSONL corpora are held in memory as decoded text (1 byte a character for
# ASCII, up to 4), and the unit being tokenized holds its ids and their copies: 8 bytes a
# token (at most one token a byte) measured with no read thread, for a one-line 50 MB
# file. The estimate takes the worst case of both.
HELD_BYTES_PER_TEXT_BYTE = 4
TOKENIZE_BYTES_PER_BYTE = 10


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
  """The memory the kernel says new work can use (MemAvailable), or None if unknown."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None
  return None


def check_text_fits_memory(path, files: list[str], available: int | None = None) -> None:
  """ConfigError with an estimate when text/JSONL `files` would not fit in memory: all
  held as text, the largest tokenized at once."""
  available = available_memory_bytes() if available is None else available
  if available is None or not files:
    return
  sizes = [os.path.getsize(f) for f in files]
  needed = HELD_BYTES_PER_TEXT_BYTE * sum(sizes) + TOKENIZE_BYTES_PER_BYTE * max(sizes)
  if needed > available:
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    raise config_error(
      "data.path",
      path,
      f"its {len(files)} file(s) ({gib(sum(sizes))}, the largest {gib(max(sizes))}) would "
      f"take about {gib(needed)} of memory as text, more than the {gib(available)} "
      "available",
      "tokenize them once (python -m flt_jax.data.prepare tokenize ... --out_dir=shards) "
      "and train on data.source='tokens', data.path='shards/*.bin', which reads from disk",
    )


# -------------------------------------------------------------------- splits
@dataclasses.dataclass
class Split:
  units: list  # shuffled / sharded over hosts
  load: Callable[[Any], list]  # unit -> docs (str, or int arrays ending in eos)
  kind: str  # 'text' (docs are str) or 'tokens' (docs are id arrays)
  description: str
  # At least as many tokens as the largest unit yields (a tokenizer gives at most a token
  # per UTF-8 byte): what one unit in flight costs the pipeline.
  max_unit_tokens: int = 0


def _tail_count(n: int, fraction: float) -> int:
  """How many of n rows go to validation: about `fraction`, at least 1, at most n - 1."""
  return max(1, min(n - 1, round(n * fraction)))


def split_lone_unit(source: str, unit, fraction: float):
  """(train unit, validation unit) of a corpus that is one unit (one text file, one
  JSONL record, one Parquet row group, one token document), split by rows: the last
  `fraction` of its lines / rows / tokens is validation. None when it has < 2 rows."""
  if source == "parquet":
    n = _parquet_rows(unit)
    if n < 2:
      return None
    cut = n - _tail_count(n, fraction)
    return (*unit, 0, cut), (*unit, cut, n)
  if source == "tokens":
    path, start, end = unit
    if end - start < 2:
      return None
    cut = end - _tail_count(end - start, fraction)
    return (path, start, cut), (path, cut, end)
  lines = unit.splitlines(keepends=True)
  if len(lines) < 2:
    return None
  cut = len(lines) - _tail_count(len(lines), fraction)
  return "".join(lines[:cut]), "".join(lines[cut:])


def _split_by_file_or_unit(file_keys, units_per_file, fraction, split):
  """units_per_file[i] = list of units of file i."""
  if len(file_keys) >= 2:
    train, val = split_keys(file_keys, fraction)
    chosen = train if split == "train" else val
    return [u for i in chosen for u in units_per_file[i]]
  units = units_per_file[0] if units_per_file else []
  keys = [f"{file_keys[0] if file_keys else ''}#{j}" for j in range(len(units))]
  train, val = split_keys(keys, fraction)
  return [units[j] for j in (train if split == "train" else val)]


def _common_root(files):
  if len(files) == 1:
    return os.path.dirname(files[0])
  return os.path.commonpath(files)


def get_split(data_config, split: str, tokenizer=None) -> Split:
  """Units and loader of one split of a text or token source."""
  d = data_config
  if split not in ("train", "validation", "all"):
    raise ValueError(f"split={split!r} is invalid: use 'train' or 'validation'")
  frac = float(d.validation_fraction)
  source = d.source
  if source == "stdlib":
    root, files = stdlib_files()
  elif source in ("text", "jsonl", "parquet", "tokens"):
    files = resolve_files(d.path, source=source)
    root = _common_root(files)
  else:
    raise ValueError(
      f"data.source={source!r} has no file split; allowed "
      "values are ('stdlib', 'text', 'jsonl', 'parquet', "
      "'tokens')"
    )
  keys = [os.path.relpath(f, root) for f in files]
  if source in ("text", "jsonl"):  # held in memory: refuse before reading what cannot fit
    check_text_fits_memory(d.path, files)

  if source in ("stdlib", "text"):
    per_file = [_text_docs(f) for f in files]
    kind, load = "text", _identity_list
  elif source == "jsonl":
    per_file = [list(_jsonl_docs(f, d.text_column, os.path.getmtime(f))) for f in files]
    kind, load = "text", _identity_list
  elif source == "parquet":
    per_file = [_parquet_units(f, d.text_column) for f in files]
    kind = "text"
    load = functools.partial(_load_parquet_row_group, column=d.text_column)
  else:
    if tokenizer is None:
      raise ValueError("data.source='tokens' needs the tokenizer the shards were made with")
    per_file = [_token_units(f, tokenizer.eos_id, tokenizer.vocab_size) for f in files]
    kind, load = "tokens", _load_token_doc

  if not any(per_file):
    raise ValueError(
      f"data.source={source!r} data.path={d.path!r}: the {len(files)} "
      "matching file(s) contain no documents (empty corpus); point "
      "data.path at non-empty files"
    )
  lone = len(files) == 1 and len(per_file[0]) == 1
  if split == "all":
    units = [u for units_of_file in per_file for u in units_of_file]
  elif lone and frac > 0:
    # One file holding one unit: split it by rows rather than leave a split empty.
    halves = split_lone_unit(source, per_file[0][0], frac)
    if halves is None:
      raise config_error(
        "data.path",
        d.path,
        f"it holds a single document of one {'row' if source == 'parquet' else 'line'}, "
        "which cannot be split into train and validation data",
        "add a second file (data.path='train.txt,more.txt': one of the files becomes the "
        "validation split), or train without evaluation: train.eval_every=0 and "
        "data.validation_fraction=0",
      )
    units = [halves[0] if split == "train" else halves[1]]
  else:
    units = _split_by_file_or_unit(keys, per_file, frac, split)
  if not units:
    raise ValueError(
      f"the {split} split of data.source={source!r} data.path={d.path!r} is "
      f"empty (validation_fraction={frac}, {len(files)} file(s)); raise "
      "data.validation_fraction or provide more files / documents"
    )
  return Split(
    units=units,
    load=load,
    kind=kind,
    description=f"{source}:{split} {len(units)} units from {len(files)} files",
    max_unit_tokens=_max_unit_tokens(source, units),
  )


def _max_unit_tokens(source: str, units: list) -> int:
  """An upper bound on the tokens of any unit of `units` (see Split.max_unit_tokens)."""
  if source == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    sizes = [
      md.row_group(g).total_byte_size
      for md in (pq.ParquetFile(f).metadata for f in sorted({u[0] for u in units}))
      for g in range(md.num_row_groups)
    ]
    return max(sizes, default=0)
  if source == "tokens":
    return max((end - start for _, start, end in units), default=0)
  return max((len(u.encode("utf-8")) for u in units), default=0)


def _identity_list(unit):
  return [unit]


def training_texts(data_config, budget_bytes: int) -> list[str]:
  """A deterministic sample (<= budget_bytes UTF-8) of the training split's
  text, used to train the BPE tokenizer."""
  sp = get_split(data_config, "train")
  order = np.random.default_rng(0).permutation(len(sp.units))
  out, used = [], 0
  for i in order:
    for text in sp.load(sp.units[int(i)]):
      n = len(text.encode("utf-8"))
      if used + n > budget_bytes:
        text = text.encode("utf-8")[: budget_bytes - used].decode("utf-8", "ignore")
        n = budget_bytes - used
      if text:
        out.append(text)
      used += n
      if used >= budget_bytes:
        return out
  return out
