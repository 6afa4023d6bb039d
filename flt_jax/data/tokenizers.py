"""Tokenizers behind one interface: bytes, locally trained byte-level BPE, file.

Every tokenizer has `vocab_size` (true size, unpadded), `eos_id` (separator
placed after each packed document), `encode(text) -> list[int]`,
`decode(ids) -> str` and `token_bytes` (int32 [vocab_size], UTF-8 bytes of each
id, 0 for special tokens) so that evaluation can report bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

from flt_jax.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|eos|>", "<eos>", "<|bos|>", "<s>")


def _check_ids(ids, vocab_size: int) -> np.ndarray:
  arr = np.asarray(ids, dtype=np.int64).reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
    raise ValueError(
      f"token id {bad} is outside the vocabulary [0, {vocab_size}); the ids "
      "were probably made with a different tokenizer (check data.tokenizer "
      "/ data.tokenizer_path)."
    )
  return arr


class Tokenizer:
  """Interface. Subclasses set vocab_size, eos_id, token_bytes."""

  vocab_size: int
  eos_id: int
  token_bytes: np.ndarray
  name: str = "tokenizer"

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def _identity_payload(self) -> bytes:
    """The bytes that define the mapping text <-> ids (hashed by `identity`)."""
    raise NotImplementedError

  def identity(self) -> dict:
    """{name, vocab_size, eos_id, sha256}: what a checkpoint records of its tokenizer.
    Two tokenizers with the same sha256 give the same ids for the same text; a BPE
    retrained on other text, or another tokenizer.json, differs even at the same size."""
    h = hashlib.sha256(self._identity_payload())
    h.update(f"|{self.vocab_size}|{self.eos_id}".encode())
    return {
      "name": self.name,
      "vocab_size": int(self.vocab_size),
      "eos_id": int(self.eos_id),
      "sha256": h.hexdigest(),
    }


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes: ids 0..255 are bytes, 256 is the separator."""

  name = "bytes"

  def __init__(self):
    self.eos_id = 256  # the one id after the 256 byte values
    self.vocab_size = self.eos_id + 1
    self.token_bytes = np.ones([self.vocab_size], np.int32)
    self.token_bytes[self.eos_id] = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    arr = _check_ids(ids, self.vocab_size)
    return bytes(arr[arr != self.eos_id].astype(np.uint8)).decode("utf-8", "replace")

  def _identity_payload(self) -> bytes:
    return b"utf-8 bytes, separator 256"


def _byte_level_alphabet() -> dict[str, int]:
  """Maps each printable stand-in character of byte-level BPE to its byte.

  Bytes that are printable Latin-1 characters stand for themselves; the other
  68 bytes are given the code points 256, 257, ... in increasing byte order.
  """
  keep = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("\xa1"), ord("\xac") + 1))
    + list(range(ord("\xae"), ord("\xff") + 1))
  )
  keep_set = set(keep)
  out, extra = {}, 0
  for b in range(256):
    if b in keep_set:
      out[chr(b)] = b
    else:
      out[chr(256 + extra)] = b
      extra += 1
  return out


class HFTokenizer(Tokenizer):
  """Wraps a `tokenizers.Tokenizer` (trained BPE or loaded tokenizer.json)."""

  def __init__(self, tok, *, eos_token: str = "", name: str = "file"):
    self.name = name
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    if eos_token:
      if eos_token not in vocab:
        raise ValueError(
          f"data.eos_token={eos_token!r} is not in the tokenizer vocabulary;"
          " set it to one of the tokenizer's special tokens or '' to detect"
        )
      eos = eos_token
    else:
      eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
      if eos is None:
        raise ValueError(
          "the tokenizer has none of the separator tokens "
          f"{_EOS_CANDIDATES}; set data.eos_token to its end-of-text token"
        )
    self.eos_id = vocab[eos]
    self.token_bytes = self._compute_token_bytes()

  def _compute_token_bytes(self) -> np.ndarray:
    spec = json.loads(self._tok.to_str())
    specials = {t["id"] for t in spec.get("added_tokens", []) if t["special"]}
    decoder = spec.get("decoder") or {}
    dec_types = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    byte_level = "ByteLevel" in dec_types
    alphabet = _byte_level_alphabet()
    out = np.zeros([self.vocab_size], np.int32)
    for i in range(self.vocab_size):
      if i in specials:
        continue
      piece = self._tok.id_to_token(i)
      if piece is None:
        continue
      if byte_level and all(c in alphabet for c in piece):
        out[i] = len(piece)
      elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        out[i] = 1  # sentencepiece byte fallback
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    arr = _check_ids(ids, self.vocab_size)
    return self._tok.decode(arr.tolist(), skip_special_tokens=True)

  def _identity_payload(self) -> bytes:
    # What maps text to ids: the model (vocab, merges), the added tokens, the normalizer
    # and pre-tokenizer; not the decoder, padding or truncation settings, nor the JSON
    # formatting of a particular tokenizers version.
    spec = json.loads(self._tok.to_str())
    added = sorted(
      (t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or []
    )
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
    keep["added_tokens"] = added
    return json.dumps(keep, sort_keys=True, ensure_ascii=False).encode("utf-8")

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._tok.save(path)


def load_tokenizer_file(path: str, eos_token: str = "") -> HFTokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top

  if not path or not os.path.isfile(path):
    raise ValueError(
      f"data.tokenizer_path={path!r} is not a file; give the path of a "
      "tokenizer.json (e.g. one written by `python -m flt_jax.data.prepare "
      "train_tokenizer`)"
    )
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(
      f"data.tokenizer_path={path!r} is not a readable tokenizer.json ({first}); give "
      "the path of a tokenizer.json written by HF tokenizers (e.g. by `python -m "
      "flt_jax.data.prepare train_tokenizer`)"
    ) from None
  return HFTokenizer(tok, eos_token=eos_token, name="file")


# BPE training time grows with the square of the longest word the pre-tokenizer makes (a
# run of letters, of digits, of other symbols or of whitespace): a 100 KB word took 5-9 s
# on 2 cores, a 400 KB one 257 s. The estimate uses the slower rate.
BPE_SECONDS_PER_SQUARED_BYTE = 1.6e-9
BPE_SLOW_SECONDS = 30.0  # longer: say so, with the estimate, and show progress
BPE_MAX_SECONDS = 900.0  # longer: refuse, saying how to shorten it
# Runs of 1,000 characters or more (shorter words train in milliseconds).
_LONG_WORD = re.compile(r"[^\W\d_]{1000,}|\d{1000,}|[^\s\w]{1000,}|\s{1000,}")


def longest_word_bytes(texts: Iterable[str]) -> int:
  """UTF-8 bytes of the longest pre-tokenized word of `texts` (0 when none reaches
  1,000 characters)."""
  return max(
    (len(m.group().encode("utf-8")) for t in texts for m in _LONG_WORD.finditer(t)), default=0
  )


def bpe_training_seconds(word_bytes: int) -> float:
  """Estimated BPE training time for a text whose longest word has `word_bytes` bytes."""
  return BPE_SECONDS_PER_SQUARED_BYTE * float(word_bytes) ** 2


def check_bpe_training(texts: Sequence[str], budget_name: str, budget: int) -> float:
  """The estimated training time of a BPE on `texts`; ConfigError when it is beyond
  BPE_MAX_SECONDS, naming the byte budget that bounds a word (`budget_name`, e.g.
  config.data.bpe_train_bytes, = `budget`)."""
  word = longest_word_bytes(texts)
  seconds = bpe_training_seconds(word)
  if seconds > BPE_MAX_SECONDS:
    max_word = int(math.sqrt(BPE_MAX_SECONDS / BPE_SECONDS_PER_SQUARED_BYTE))
    raise ConfigError(
      f"{budget_name}={budget!r} is invalid: the text it takes for BPE training holds a "
      f"word of {word:,} bytes with no break (a run of letters, digits, symbols or "
      "whitespace), and BPE training time grows with the square of a word's length: about "
      f"{seconds / 60:,.0f} min. Fix: set {budget_name} to at most {max_word:,}, break the "
      "text into lines or words, or use the bytes tokenizer."
    )
  return seconds


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> HFTokenizer:
  """Trains a byte-level BPE (lossless: decode(encode(s)) == s)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    show_progress=show_progress,
    special_tokens=[EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return HFTokenizer(tok, eos_token=EOS_TOKEN, name="bpe")


def train_bpe_checked(
  texts: Sequence[str], vocab_size: int, budget_name: str, budget: int
) -> HFTokenizer:
  """train_bpe after check_bpe_training; a training estimated to take long is announced
  on stderr with its estimate, shows the trainer's progress bars on a terminal, and says
  how long it took."""
  seconds = check_bpe_training(texts, budget_name, budget)
  slow = seconds > BPE_SLOW_SECONDS
  if slow:
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(
      f"training a BPE tokenizer (vocabulary {vocab_size:,}) on {size:,} bytes of text: "
      f"about {seconds:,.0f} s, as its longest word has {longest_word_bytes(texts):,} bytes "
      f"(lower {budget_name} to train faster)",
      file=sys.stderr,
      flush=True,
    )
  start = time.monotonic()
  tok = train_bpe(texts, vocab_size, show_progress=slow)
  if slow:
    print(f"trained the BPE tokenizer in {time.monotonic() - start:,.0f} s", file=sys.stderr)
  return tok


_BPE_CACHE: dict[str, HFTokenizer] = {}
_BPE_LOCK = threading.Lock()


def bpe_from_texts(
  texts: Sequence[str],
  vocab_size: int,
  cache_path: str = "",
  budget_name: str = "config.data.bpe_train_bytes",
  budget: int = 0,
) -> HFTokenizer:
  """Trains (or loads from the memory / disk cache) a BPE on `texts`, which are at most
  `budget` bytes (the setting `budget_name`), checked by train_bpe_checked."""
  h = hashlib.sha256(f"bpe-v1:{vocab_size}:{len(texts)}".encode())
  for t in texts:
    h.update(hashlib.sha256(t.encode("utf-8", "replace")).digest())
  key = h.hexdigest()
  with _BPE_LOCK:
    if key in _BPE_CACHE:
      return _BPE_CACHE[key]
    meta_path = cache_path + ".meta.json" if cache_path else ""
    if cache_path and os.path.isfile(cache_path) and os.path.isfile(meta_path):
      with open(meta_path) as f:
        if json.load(f).get("fingerprint") == key:
          tok = load_tokenizer_file(cache_path, EOS_TOKEN)
          tok.name = "bpe"
          _BPE_CACHE[key] = tok
          return tok
      logging.info("BPE cache %s is for another corpus; retraining", cache_path)
    tok = train_bpe_checked(texts, vocab_size, budget_name, budget)
    if cache_path:
      tok.save(cache_path)
      with open(meta_path, "w") as f:
        json.dump({"fingerprint": key, "vocab_size": vocab_size}, f)
    _BPE_CACHE[key] = tok
    return tok
