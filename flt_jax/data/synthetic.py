"""Embedded synthetic reasoning tasks where the number of loops matters.

multihop: a shuffled table of pointers a > f(a) (f a random permutation of
  num_nodes nodes), then a query "| x hops k ?" whose answer is f^k(x).
  Text:  "3 > 7 , 0 > 2 , ... | 3 hops 2 ? 5"
modarith: arithmetic mod p, either a chain of assignments
  "v0 = 4 ; v1 = v0 * 3 ; v2 = 5 - v1 ; v2 ? 10"
  (each statement uses the previous variable, so depth = chain length), or a
  nested expression "( ( 4 * 3 ) - 5 ) = 7" (depth = nesting).

Example i of a split is a pure function of (task_seed, split, i), so the data
is deterministic, random-access and needs no download. Every example records
its answer span so accuracy can be measured on it. Symbols are whitespace
separated; each symbol is one token of a small task vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flt_jax.constants import IGNORE_LABEL, PAD_SEGMENT
from flt_jax.data import tokenizers

_SPLIT_CODE = {"train": 0, "validation": 1}


class SymbolTokenizer(tokenizers.Tokenizer):
  """Word-level tokenizer over a fixed symbol list; id 0 is the separator.

  token_bytes counts each symbol's UTF-8 bytes plus its delimiting space, so
  sum(token_bytes[encode(s)]) == len(s.encode()) + 1.
  """

  name = "symbols"

  def __init__(self, symbols: Sequence[str]):
    self.eos_id = 0
    self.symbols = ["<eos>"] + list(symbols)
    self._ids = {s: i for i, s in enumerate(self.symbols)}
    self.vocab_size = len(self.symbols)
    # The separator stands for no text; a symbol for its bytes and one delimiting space.
    self.token_bytes = np.array([0] + [len(s.encode("utf-8")) + 1 for s in symbols], np.int32)

  def encode(self, text: str) -> list[int]:
    out = []
    for s in text.split():
      if s not in self._ids:
        raise ValueError(f"symbol {s!r} is not in the task vocabulary")
      out.append(self._ids[s])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    arr = tokenizers._check_ids(ids, self.vocab_size)  # pylint: disable=protected-access
    return " ".join(self.symbols[i] for i in arr.tolist() if i != self.eos_id)

  def _identity_payload(self) -> bytes:
    return "\n".join(self.symbols).encode("utf-8")


@dataclasses.dataclass
class Example:
  tokens: np.ndarray  # int32 [L], ends with the separator (eos)
  answer_start: int  # answer = tokens[answer_start:answer_end]
  answer_end: int
  hops_or_depth: int


class _Task:
  tokenizer: SymbolTokenizer

  def _rng(self, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([self.task_seed, _SPLIT_CODE[split], index])

  def _finish(self, syms: list, answer: Sequence, k: int) -> Example:
    ids = self.tokenizer.encode(" ".join(map(str, syms)))
    start = len(ids)
    ids += self.tokenizer.encode(" ".join(map(str, answer)))
    end = len(ids)
    ids.append(self.tokenizer.eos_id)
    return Example(np.asarray(ids, np.int32), start, end, k)


class MultiHop(_Task):
  """Multi-hop pointer chasing."""

  def __init__(self, cfg):
    self.num_nodes = int(cfg.num_nodes)
    self.hops_min, self.hops_max = int(cfg.hops_min), int(cfg.hops_max)
    self.task_seed = int(cfg.task_seed)
    nums = [str(i) for i in range(max(self.num_nodes, self.hops_max + 1))]
    self.tokenizer = SymbolTokenizer([">", ",", "|", "hops", "?"] + nums)

  def max_length(self) -> int:
    return 4 * self.num_nodes + 6

  def example(self, split: str, index: int) -> Example:
    rng = self._rng(split, index)
    n = self.num_nodes
    nxt = rng.permutation(n)
    order = rng.permutation(n)
    k = int(rng.integers(self.hops_min, self.hops_max + 1))
    x = int(rng.integers(n))
    syms = []
    for j, a in enumerate(order):
      if j:
        syms.append(",")
      syms += [int(a), ">", int(nxt[a])]
    y = x
    for _ in range(k):
      y = int(nxt[y])
    syms += ["|", x, "hops", k, "?"]
    return self._finish(syms, [y], k)


class ModArith(_Task):
  """Modular-arithmetic chains / nested expressions."""

  def __init__(self, cfg):
    self.p = int(cfg.modulus)
    self.depth_min, self.depth_max = int(cfg.depth_min), int(cfg.depth_max)
    self.form = cfg.form
    self.ops = list(cfg.ops)
    self.task_seed = int(cfg.task_seed)
    nums = [str(i) for i in range(self.p)]
    names = [f"v{i}" for i in range(self.depth_max + 1)]
    self.tokenizer = SymbolTokenizer(["=", ";", "?", "(", ")", "+", "-", "*"] + names + nums)

  def max_length(self) -> int:
    if self.form == "chain":
      return 6 * self.depth_max + 8
    return 4 * self.depth_max + 4

  def _apply(self, a: int, op: str, b: int) -> int:
    if op == "+":
      return (a + b) % self.p
    if op == "-":
      return (a - b) % self.p
    return (a * b) % self.p

  def example(self, split: str, index: int) -> Example:
    rng = self._rng(split, index)
    p = self.p
    depth = int(rng.integers(self.depth_min, self.depth_max + 1))
    if self.form == "chain":
      c0 = int(rng.integers(p))
      vals = [c0]
      syms = ["v0", "=", c0, ";"]
      for i in range(1, depth + 1):
        op = self.ops[int(rng.integers(len(self.ops)))]
        if i >= 2 and rng.random() < 0.5:  # an earlier variable
          j = int(rng.integers(i - 1))
          other_sym, other = f"v{j}", vals[j]
        else:
          other = int(rng.integers(p))
          other_sym = other
        prev_sym, prev = f"v{i - 1}", vals[i - 1]
        if rng.random() < 0.5:
          lhs, rhs, value = prev_sym, other_sym, self._apply(prev, op, other)
        else:
          lhs, rhs, value = other_sym, prev_sym, self._apply(other, op, prev)
        vals.append(value)
        syms += [f"v{i}", "=", lhs, op, rhs, ";"]
      syms += [f"v{depth}", "?"]
      return self._finish(syms, [vals[-1]], depth)
    value = int(rng.integers(p))
    expr = [value]
    for _ in range(depth):
      op = self.ops[int(rng.integers(len(self.ops)))]
      c = int(rng.integers(p))
      if rng.random() < 0.5:
        expr, value = ["("] + expr + [op, c, ")"], self._apply(value, op, c)
      else:
        expr, value = ["(", c, op] + expr + [")"], self._apply(c, op, value)
    return self._finish(expr + ["="], [value], depth)


def make_task(data_config) -> _Task:
  if data_config.source == "multihop":
    return MultiHop(data_config.multihop)
  if data_config.source == "modarith":
    return ModArith(data_config.modarith)
  raise ValueError(
    f"data.source={data_config.source!r} is not a synthetic "
    "task; allowed values are ('multihop', 'modarith')"
  )


def max_example_length(data_config) -> int:
  """Longest example in tokens, including the trailing separator."""
  return make_task(data_config).max_length()


def example_to_row(ex: Example, seq_len: int, loss_on_answer_only: bool) -> dict[str, np.ndarray]:
  """One example, padded to a row: inputs/targets/segment_ids/answer_mask."""
  n = len(ex.tokens)
  if n > seq_len + 1:
    raise ValueError(
      f"a synthetic example has {n} tokens but seq_len + 1 = {seq_len + 1}; "
      "raise config.model.seq_len or shrink the task"
    )
  row = np.zeros([seq_len + 1], np.int32)
  row[:n] = ex.tokens
  seg = np.full([seq_len + 1], PAD_SEGMENT, np.int32)
  seg[:n] = PAD_SEGMENT + 1
  targets = row[1:].copy()
  targets[seg[1:] == PAD_SEGMENT] = IGNORE_LABEL
  answer_mask = np.zeros([seq_len], np.int32)
  answer_mask[ex.answer_start - 1 : ex.answer_end - 1] = 1
  if loss_on_answer_only:
    targets[answer_mask == 0] = IGNORE_LABEL
  return {
    "inputs": row[:-1],
    "targets": targets,
    "segment_ids": seg[:-1],
    "positions": np.where(seg[:-1] != PAD_SEGMENT, np.arange(seq_len, dtype=np.int32), 0).astype(
      np.int32
    ),
    "answer_mask": answer_mask,
  }
