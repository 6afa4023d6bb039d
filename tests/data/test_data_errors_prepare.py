"""Bad input gives clear errors; the prepare command works end to end."""

import json

import numpy as np
import pytest

from flt_jax.data import config as config_lib
from flt_jax.data import pipeline as pl
from flt_jax.data import prepare, sources


def _cfg(**kw):
  d = config_lib.get_config()
  for k, v in kw.items():
    setattr(d, k, v)
  return d


def _make(d, seq_len=16):
  return pl.make_pipeline(d, split="train", seq_len=seq_len, batch_size=2)


def test_glob_matching_nothing(tmp_path):
  with pytest.raises(ValueError, match=r"matched no files.*data.source='stdlib'"):
    _make(_cfg(source="text", path=str(tmp_path / "nope/*.txt")))


def test_empty_corpus(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="empty corpus"):
    _make(_cfg(source="text", path=str(tmp_path / "*.txt")))
  with pytest.raises(ValueError, match="empty corpus"):
    _make(_cfg(source="jsonl", path=str(tmp_path / "*.jsonl")))


def test_parquet_without_column(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "a.parquet")
  with pytest.raises(ValueError, match=r"no column data.text_column='text'.*content"):
    _make(_cfg(source="parquet", path=str(tmp_path / "*.parquet")))


def test_token_id_beyond_vocab_in_shard(tmp_path):
  np.save(tmp_path / "a.npy", np.array([1, 2, 300, 256], np.uint16))
  with pytest.raises(ValueError, match="beyond the vocabulary"):
    _make(_cfg(source="tokens", path=str(tmp_path / "*.npy")))
  sources.write_token_shard(
    str(tmp_path / "b.bin"), np.array([1, 256]), vocab_size=4096, eos_id=0, num_docs=1
  )
  with pytest.raises(ValueError, match="vocab_size=4096"):
    _make(_cfg(source="tokens", path=str(tmp_path / "*.bin")))


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_seq_len_below_two(seq_len):
  with pytest.raises(ValueError, match="seq_len >= 2"):
    _make(_cfg(), seq_len=seq_len)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("source", "web", "data.source=.web.*allowed"),
    ("tokenizer", "sp", "data.tokenizer=.sp.*allowed"),
    ("validation_fraction", 1.5, "validation_fraction"),
  ],
)
def test_bad_fields_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_cfg(**{field: value}), seq_len=16)


def test_bad_task_knobs():
  d = _cfg(source="multihop")
  d.multihop.hops_min, d.multihop.hops_max = 3, 2
  with pytest.raises(ValueError, match="multihop.hops_max"):
    config_lib.validate(d, seq_len=128)
  d = _cfg(source="modarith")
  d.modarith.ops = "+/"
  with pytest.raises(ValueError, match="modarith.ops"):
    config_lib.validate(d, seq_len=128)


def test_prepare_train_tokenizer_and_tokenize(tmp_path, capsys):
  docs = [f"línea {i}: " + "abc def " * (i % 7 + 1) for i in range(60)]
  with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
    for t in docs:
      f.write(json.dumps({"text": t}) + "\n")
  tok_path = str(tmp_path / "tok" / "tokenizer.json")
  assert (
    prepare.main(
      [
        "train_tokenizer",
        "--source=jsonl",
        f"--path={tmp_path}/*.jsonl",
        "--vocab_size=300",
        f"--out={tok_path}",
      ]
    )
    == 0
  )
  assert (
    prepare.main(
      [
        "tokenize",
        "--source=jsonl",
        f"--path={tmp_path}/*.jsonl",
        "--tokenizer=file",
        f"--tokenizer_path={tok_path}",
        "--shard_tokens=200",
        f"--out_dir={tmp_path}/shards",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  summary = json.loads(out[out.rindex("{\n") :])
  assert summary["documents"] == 60 and summary["shards"] >= 2
  assert summary["bytes"] == sum(len(t.encode()) for t in docs)
  d = _cfg(
    source="tokens", path=f"{tmp_path}/shards/*.bin", tokenizer="file", tokenizer_path=tok_path
  )
  sp = sources.get_split(d, "all", pl.make_tokenizer(d))
  tok = pl.make_tokenizer(d)
  texts = [tok.decode(x) for u in sp.units for x in sp.load(u)]
  assert texts == docs
  b = next(iter(_make(d)))
  assert b["inputs"].shape == (2, 16)
  assert (
    prepare.main(["tokenize", "--source=text", "--path=/nonexistent/*", f"--out_dir={tmp_path}/x"])
    == 2
  )


def _split_texts(d):
  """{split: the documents of its units}."""
  out = {}
  for split in ("train", "validation"):
    sp = sources.get_split(d, split, pl.make_tokenizer(d))
    out[split] = [doc for unit in sp.units for doc in sp.load(unit)]
  return out


def test_a_single_text_file_is_split_by_lines(tmp_path):
  lines = [f"line {i} of the only file\n" for i in range(20)]
  (tmp_path / "one.txt").write_text("".join(lines))
  texts = _split_texts(_cfg(source="text", path=str(tmp_path / "one.txt"), validation_fraction=0.1))
  assert texts == {"train": ["".join(lines[:18])], "validation": ["".join(lines[18:])]}


def test_a_single_row_group_parquet_is_split_by_rows(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  rows = [f"document {i}" for i in range(10)]
  path = tmp_path / "small.parquet"
  # One row group, as pandas' to_parquet writes a small frame.
  pq.write_table(pa.table({"text": rows}), path)
  assert pq.ParquetFile(path).metadata.num_row_groups == 1
  texts = _split_texts(_cfg(source="parquet", path=str(path), validation_fraction=0.2))
  assert texts == {"train": rows[:8], "validation": rows[8:]}
  val = pl.make_pipeline(
    _cfg(source="parquet", path=str(path), validation_fraction=0.2),
    split="validation",
    seq_len=8,
    batch_size=2,
  )
  assert len(list(val)) >= 1


def test_a_single_line_is_refused_with_a_fix_that_works(tmp_path):
  (tmp_path / "one.txt").write_text("a single line without a newline")
  d = _cfg(source="text", path=str(tmp_path / "one.txt"))
  with pytest.raises(ValueError) as e:
    _make(d)
  msg = str(e.value)
  assert "single document of one line" in msg and "train.eval_every=0" in msg
  d.validation_fraction = 0.0  # the fix: train on all of it (and do not evaluate)
  assert next(iter(_make(d)))["inputs"].shape == (2, 16)


def test_stream_changes_name_the_fields_that_move_the_saved_position():
  d = config_lib.get_config()
  saved = d.to_dict()
  assert config_lib.stream_changes(saved, d) == []
  d.read_threads = 7  # the iterator state does not depend on it
  d.bpe_vocab_size = 300  # the tokenizer is checked by its identity instead
  assert config_lib.stream_changes(saved, d) == []
  d.num_workers, d.shuffle = 1, False
  # The window follows data.shuffle: only what was set is named.
  assert config_lib.stream_changes(saved, d) == [
    ("data.shuffle", True, False),
    ("data.num_workers", 0, 1),
  ]
  d2 = config_lib.get_config()
  d2.shuffle_window_rows = 1  # 0 and 1 both mean no row shuffle
  saved2 = dict(saved, shuffle_window_rows=0)
  assert config_lib.stream_changes(saved2, d2) == []
