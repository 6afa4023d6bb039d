"""The `config.model` section: defaults, validation, and a frozen view for modules."""

from __future__ import annotations

import dataclasses
import math

import ml_collections

VARIANTS = ("FLT", "FLT_res", "LT", "LT_i", "LT_ia")
LOSS_TYPES = ("END", "STEP", "FEW")
REMAT_POLICIES = ("none", "loop", "block", "block_save_dots")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla",)


def get_config() -> ml_collections.ConfigDict:
  """Defaults for `config.model` (a tiny CPU model; experiments override)."""
  c = ml_collections.ConfigDict()
  c.variant = "FLT"
  c.loops = 12  # K; can be changed at evaluation time
  c.loss_type = "END"
  c.vocab_size = 256  # true vocabulary; padded to vocab_pad_multiple internally
  c.vocab_pad_multiple = 64
  c.n_layer = 2
  c.d_model = 128
  c.n_head = 1
  c.n_kv_head = 1
  c.kv_lora_rank = 0  # > 0 selects MLA attention
  c.window_pattern = "L"  # tiled over layers; S = seq_len // 4 window; last layer always L
  c.seq_len = 256  # training context; sets the S window and the rotary table
  c.rope_base = 10000.0
  c.rope_max_len = 0  # rotary table length; 0 = 10 * seq_len as the reference does
  c.rope_bf16 = False  # round rotary tables to bfloat16 like the published reference
  c.softcap = 15.0
  c.dtype = "float32"  # compute dtype; params and loss stay float32
  c.remat = "none"
  c.attention_impl = "xla"
  return c


def _fail(field: str, value, allowed: str) -> None:
  raise ValueError(f"config.model.{field}={value!r} is invalid: {allowed}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending field, its value and what is allowed."""
  if c.variant not in VARIANTS:
    _fail("variant", c.variant, f"choose one of {VARIANTS}")
  if c.loss_type not in LOSS_TYPES:
    _fail("loss_type", c.loss_type, f"choose one of {LOSS_TYPES}")
  if c.remat not in REMAT_POLICIES:
    _fail("remat", c.remat, f"choose one of {REMAT_POLICIES}")
  if c.dtype not in DTYPES:
    _fail("dtype", c.dtype, f"choose one of {DTYPES}")
  if c.attention_impl not in ATTENTION_IMPLS:
    _fail("attention_impl", c.attention_impl, f"choose one of {ATTENTION_IMPLS}")
  for field in (
    "loops",
    "n_layer",
    "d_model",
    "n_head",
    "n_kv_head",
    "vocab_size",
    "vocab_pad_multiple",
  ):
    v = c[field]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      _fail(field, v, "must be an integer >= 1")
  if c.seq_len < 2:
    _fail("seq_len", c.seq_len, "must be an integer >= 2")
  if c.d_model % c.n_head:
    _fail("n_head", c.n_head, f"must divide d_model={c.d_model} (head_dim = d_model / n_head)")
  if c.n_head % c.n_kv_head:
    _fail("n_kv_head", c.n_kv_head, f"must divide n_head={c.n_head} (grouped-query attention)")
  if (c.d_model // c.n_head) % 2:
    _fail(
      "n_head",
      c.n_head,
      f"gives an odd head_dim={c.d_model // c.n_head}; rotary embedding needs an even one",
    )
  if c.kv_lora_rank < 0:
    _fail("kv_lora_rank", c.kv_lora_rank, "must be 0 (standard attention) or a positive MLA rank")
  pattern = c.window_pattern
  if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - {"S", "L"}:
    _fail(
      "window_pattern",
      pattern,
      "must be a non-empty string of 'S' (window seq_len//4) and 'L' (full), e.g. 'SSSL'",
    )
  if c.rope_max_len and c.rope_max_len < c.seq_len:
    _fail(
      "rope_max_len",
      c.rope_max_len,
      f"the rotary table is shorter than seq_len={c.seq_len}; raise it or set 0 (= 10*seq_len)",
    )
  if not c.softcap > 0:
    _fail("softcap", c.softcap, "must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Immutable, hashable copy of `config.model` that Flax modules hold."""

  variant: str
  loops: int
  loss_type: str
  vocab_size: int
  vocab_pad_multiple: int
  n_layer: int
  d_model: int
  n_head: int
  n_kv_head: int
  kv_lora_rank: int
  window_pattern: str
  seq_len: int
  rope_base: float
  rope_max_len: int
  rope_bf16: bool
  softcap: float
  dtype: str
  remat: str
  attention_impl: str

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> ModelConfig:
    validate(c)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(c.keys()) - set(names))
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; known keys: {sorted(names)}")
    return cls(**{n: c[n] for n in names})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return int(math.ceil(self.vocab_size / m) * m)

  @property
  def rope_table_len(self) -> int:
    return self.rope_max_len or 10 * self.seq_len

  @property
  def window_sizes(self) -> tuple[int, ...]:
    """Per-layer left window (-1 = full context); the last layer is always full."""
    short = max(self.seq_len // 4, 1)
    pattern = self.window_pattern.upper()
    sizes = [short if pattern[i % len(pattern)] == "S" else -1 for i in range(self.n_layer)]
    sizes[-1] = -1
    return tuple(sizes)

  def loss_loops(self, loops: int) -> tuple[int, ...]:
    """Which loops' losses are averaged for this loss type."""
    if self.loss_type == "STEP":
      return tuple(range(loops))
    if self.loss_type == "FEW":
      return tuple(range(2 * loops // 3, loops))
    return (loops - 1,)
