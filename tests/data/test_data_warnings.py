"""Data that would train on garbage says so, and preparation that cannot fit (in memory, in
time) is refused with an estimate before it starts."""

import logging
import os

import numpy as np
import pytest

from flt_jax.data import config as data_config
from flt_jax.data import pipeline, sources
from flt_jax.data import tokenizers as tokenizers_lib
from flt_jax.errors import ConfigError


def _config(source, path, **fields):
  d = data_config.get_config()
  d.update(dict(source=source, path=str(path), **fields))
  return d


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_invalid_utf8_is_counted_and_named(tmp_path, caplog):
  path = tmp_path / "mixed.txt"
  raw = "héllo wörld\n".encode() * 3 + b"\xff\xfe\x80 tail \xc3\n"  # 4 bytes are not UTF-8
  path.write_bytes(raw)
  with caplog.at_level(logging.WARNING):
    docs = sources._text_docs(str(path))
  assert docs == [raw.decode("utf-8", "replace")]  # the text trains as before
  (message,) = _warnings(caplog)
  assert message.startswith(f"{path}: 4 of its {len(raw)} bytes are not UTF-8 and become U+FFFD")


def test_a_binary_file_warns_once(tmp_path, caplog):
  path = tmp_path / "model.bin"
  path.write_bytes(bytes(range(256)) * 8)
  with caplog.at_level(logging.WARNING):
    for split in ("train", "validation", "train"):
      sources.get_split(_config("text", path), split)
  (message,) = _warnings(caplog)
  assert f"{path}: 1,024 of its 2,048 bytes are not UTF-8" in message


def test_valid_text_holding_a_replacement_character_is_quiet(tmp_path, caplog):
  path = tmp_path / "ok.txt"
  path.write_text("a \ufffd in the text itself\nsecond line\n", encoding="utf-8")
  with caplog.at_level(logging.WARNING):
    sources._text_docs(str(path))
  assert _warnings(caplog) == []


def test_jsonl_records_decode_as_before_and_warn_on_bad_bytes(tmp_path, caplog):
  good = tmp_path / "good.jsonl"
  # A BOM, and U+2028 / U+0085 inside a string: one record per "\n"-ended line.
  good.write_bytes(b'\xef\xbb\xbf{"text": "one\xe2\x80\xa8two\xc2\x85"}\n{"text": "three"}\n')
  with caplog.at_level(logging.WARNING):
    docs = sources._jsonl_docs(str(good), "text", os.path.getmtime(good))
  assert docs == ("one\u2028two\x85", "three") and _warnings(caplog) == []
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
  with caplog.at_level(logging.WARNING):
    docs = sources._jsonl_docs(str(bad), "text", os.path.getmtime(bad))
  assert docs == ("caf\ufffd",)
  assert _warnings(caplog) == [
    f"{bad}: 1 of its 17 bytes are not UTF-8 and become U+FFFD (a binary file, or text in "
    "another encoding? convert it with iconv, or leave it out of data.path)"
  ]


# ----------------------------------------------------------------------------- memory


def test_read_ahead_shrinks_for_large_units():
  budget_tokens = pipeline.READ_AHEAD_BYTES // pipeline.READ_BYTES_PER_TOKEN
  assert pipeline.read_ahead(2, 10_000) == (2, 8)  # ordinary documents: as configured
  assert pipeline.read_ahead(0, 10_000) == (0, 0)
  assert pipeline.read_ahead(4, budget_tokens // 2) == (2, 8)
  assert pipeline.read_ahead(2, budget_tokens + 1) == (0, 0)  # one huge line: no read-ahead


def test_fewer_read_threads_give_the_same_batches(tmp_path):
  # Read-ahead changes memory and speed only: batches (and saved positions) are the same.
  for i in range(5):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * (40 + 30 * i))
  batches = {}
  for threads in (0, 2):
    d = _config("text", tmp_path / "*.txt", read_threads=threads, shuffle_window_rows=4)
    p = pipeline.make_pipeline(d, split="train", seq_len=16, batch_size=3)
    it = iter(p)
    batches[threads] = [next(it) for _ in range(12)]
    split = sources.get_split(d, "train")
    assert split.max_unit_tokens == max(len(u) for u in split.units) > 1000
  for a, b in zip(batches[0], batches[2]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_text_that_cannot_fit_in_memory_is_refused_with_an_estimate(tmp_path):
  path = tmp_path / "big.txt"
  path.write_bytes(b"x" * 1000)
  sources.check_text_fits_memory(str(path), [str(path)], available=14_000)  # 4 + 10 per byte
  with pytest.raises(ConfigError) as e:
    sources.check_text_fits_memory(str(path), [str(path)], available=13_999)
  message = str(e.value)
  assert message.startswith(f"config.data.path='{path}' is invalid: its 1 file(s)")
  assert "would take about 0.0 GiB of memory as text" in message
  assert "python -m flt_jax.data.prepare tokenize" in message and "data.source='tokens'" in message


def test_available_memory_reads_meminfo(tmp_path):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
  assert sources.available_memory_bytes(str(meminfo)) == 2048 * 1024
  assert sources.available_memory_bytes(str(tmp_path / "none")) is None


# ----------------------------------------------------------------------------- BPE time


def test_longest_word_counts_runs_of_one_character_class():
  text = "short words 12 ++ " + "a" * 1500 + "1" * 1200 + " " * 1100 + "é" * 1000
  assert tokenizers_lib.longest_word_bytes([text, "x"]) == 2000  # é is 2 bytes
  assert tokenizers_lib.longest_word_bytes(["the quick brown fox " * 1000]) == 0


def test_bpe_training_on_one_endless_word_is_refused_before_it_starts(tmp_path):
  path = tmp_path / "one_line.txt"
  path.write_text("ACGT" * 250_000)  # 1 MB with no break: hours of BPE training
  d = _config("text", path, tokenizer="bpe", validation_fraction=0.0)
  with pytest.raises(ConfigError) as e:
    pipeline.make_tokenizer(d)
  message = str(e.value)
  assert message.startswith(
    "config.data.bpe_train_bytes=2000000 is invalid: the text it takes for BPE training "
    "holds a word of 1,000,000 bytes"
  )
  assert (
    "about 27 min" in message and "set config.data.bpe_train_bytes to at most 750,000" in message
  )


def test_a_long_bpe_training_is_announced_with_its_estimate(monkeypatch, capsys):
  monkeypatch.setattr(tokenizers_lib, "BPE_SLOW_SECONDS", -1.0)
  texts = ["def f(x):\n  return x + 1\n" * 50]
  tok = tokenizers_lib.train_bpe_checked(texts, 300, "config.data.bpe_train_bytes", 2_000_000)
  assert tok.decode(tok.encode(texts[0])) == texts[0]
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith(
    f"training a BPE tokenizer (vocabulary 300) on {len(texts[0]):,} bytes of text: about 0 s"
  )
  assert err[-1].startswith("trained the BPE tokenizer in ")


def test_the_estimate_grows_with_the_square_of_the_longest_word():
  one = tokenizers_lib.bpe_training_seconds(100_000)
  assert tokenizers_lib.bpe_training_seconds(400_000) == pytest.approx(16 * one)
  assert 100 < tokenizers_lib.bpe_training_seconds(400_000) < 1000
