"""The `config.model` section: `ModelConfig` is its one definition.

`ModelConfig`'s field defaults are the section's defaults (`get_config` derives the
ConfigDict from them); `ModelConfig.from_config` validates a section and freezes it for
the Flax modules, taking the vocabulary size from the tokenizer when the section says 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from flt_jax.errors import config_error
from flt_jax.model import attention

VARIANTS = ("FLT", "FLT_res", "LT", "LT_i", "LT_ia")
LOSS_TYPES = ("END", "STEP", "FEW")
DTYPES = ("float32", "bfloat16")
# How attention is computed (model/attention.py has the table of what runs where).
ATTENTION_IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")
# Where rematerialisation checkpoints go: nowhere, around each loop (keep only the K loop
# carries), or around each block (keep each layer's input).
REMAT_PLACES = ("none", "loop", "block")
# What a rematerialised region saves instead of recomputing: a jax.checkpoint_policies
# policy by name, or a comma-separated list of the tensor names below (MaxText style).
REMAT_POLICIES = {
  "nothing": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  "everything": jax.checkpoint_policies.everything_saveable,
}
# Tensors tagged with jax.ad_checkpoint.checkpoint_name inside a block.
CHECKPOINT_NAMES = ("qkv", "attn_out", "mlp_in", "mlp_hidden")
# How training picks each step's loop count (model/loop_count.py): always `loops`; a
# Poisson-lognormal draw of mean `loops` (Huginn, arXiv 2502.05171); uniform on
# 1..max_loops.
LOOP_SAMPLINGS = ("fixed", "poisson_lognormal", "uniform")


def remat_policy(name: str):
  """The jax.checkpoint policy that `config.model.remat_policy` names."""
  if name in REMAT_POLICIES:
    return REMAT_POLICIES[name]
  return jax.checkpoint_policies.save_only_these_names(*name.split(","))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Immutable, hashable `config.model` that Flax modules hold. Defaults: a tiny CPU model."""

  variant: str = "FLT"
  loops: int = 12  # K; can be changed at evaluation time
  loss_type: str = "END"
  # Training's loop count per step: one of LOOP_SAMPLINGS. Random draws are the same on
  # every device and host, a function of (train.seed, step) only; eval uses `loops`.
  loop_sampling: str = "fixed"
  max_loops: int = 0  # bound of every random draw (>= loops); unused by 'fixed'
  # Gradient through the last k loops of a step only (0 = all): the loops before run
  # without gradient and keep no activations, so memory is bounded by k.
  backprop_loops: int = 0
  vocab_size: int = 0  # true vocabulary (padded internally); 0 in a config = the tokenizer's
  vocab_pad_multiple: int = 64
  n_layer: int = 2
  d_model: int = 128
  n_head: int = 1
  n_kv_head: int = 1
  kv_lora_rank: int = 0  # > 0 selects MLA attention
  window_pattern: str = "L"  # tiled over layers; S = seq_len // 4 window; last layer always L
  seq_len: int = 256  # training context; sets the S window and the rotary table
  rope_base: float = 10000.0
  rope_max_len: int = 0  # rotary table length; 0 = 10 * seq_len as the reference does
  rope_bf16: bool = False  # round rotary tables to bfloat16 like the published reference
  softcap: float = 15.0
  dtype: str = "float32"  # compute dtype; params and loss stay float32
  remat: str = "none"  # where: one of REMAT_PLACES
  remat_policy: str = "nothing"  # what is saved: REMAT_POLICIES key or CHECKPOINT_NAMES list
  # Run the layer scan fully unrolled (lax.scan unroll=n_layer): the same params and math,
  # with each layer's static settings (window, query injection) known to the compiler and
  # no per-layer slicing of the stacked params; compile time grows with n_layer.
  unroll_layers: bool = False
  attention_impl: str = "xla"
  # Kernel tiles for pallas/splash (0 = the kernel's default for the platform; TPU needs
  # multiples of 128, Triton powers of two >= 16).
  attention_block_q: int = 0
  attention_block_kv: int = 0
  # Packed rows: attend only within each document and restart RoPE positions per document.
  # Off by default because the official implementation attends across packed documents.
  separate_documents: bool = False
  # The platform the model is compiled for ("cpu", "gpu", "tpu"; "" = the default backend
  # when traced), set by for_devices from the mesh's devices. It picks the kernels, and is
  # no config field: a checkpoint trained on TPU restores on GPU.
  platform: str = dataclasses.field(default="", metadata={"config": False})

  @classmethod
  def from_config(
    cls, c: ml_collections.ConfigDict, tokenizer_vocab_size: int | None = None
  ) -> ModelConfig:
    """Validates `c` and freezes it; `c.vocab_size=0` takes `tokenizer_vocab_size`."""
    validate(c)
    values = {f.name: c[f.name] for f in config_fields()}
    values["vocab_size"] = resolve_vocab_size(c.vocab_size, tokenizer_vocab_size)
    return cls(**values)

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

  @property
  def attention_options(self) -> attention.KernelOptions:
    """Static kernel settings for `attention.attend`: tiles, the layers' windows and the
    target platform."""
    return attention.KernelOptions(
      block_q=self.attention_block_q,
      block_kv=self.attention_block_kv,
      windows=tuple(sorted(set(self.window_sizes))),
      platform=self.platform,
    )

  def for_platform(self, platform: str) -> ModelConfig:
    """This config compiled for `platform`; ConfigError when its attention_impl cannot
    run there."""
    platform = attention.platform_name(platform)
    try:
      attention.choose_impl(self.attention_impl, platform)
    except ValueError as e:
      raise config_error(
        "model.attention_impl",
        self.attention_impl,
        f"it cannot run on {platform}",
        f"choose one of {attention.PLATFORM_IMPLS.get(platform, ('xla',))} or 'auto'",
      ) from e
    return dataclasses.replace(self, platform=platform)

  def for_devices(self, devices) -> ModelConfig:
    """This config compiled for the platform of `devices` (a mesh's, concrete or
    compile-only), so a program built for a GPU or TPU topology on a CPU host picks the
    kernels that running there would."""
    return self.for_platform(attention.platform_of(devices))

  def describe_attention(self) -> str:
    """`attention: auto -> cudnn (gpu: cuDNN flash attention)`: what the model's attention
    calls run on its platform (training, eval and prefill take the same path)."""
    return attention.describe_choice(
      self.attention_impl,
      self.platform,
      has_segments=self.separate_documents,
      float32=self.dtype == "float32",
    )

  def loss_loops(self, loops: int) -> tuple[int, ...]:
    """Which loops' losses are averaged for this loss type."""
    if self.loss_type == "STEP":
      return tuple(range(loops))
    if self.loss_type == "FEW":
      return tuple(range(2 * loops // 3, loops))
    return (loops - 1,)

  @property
  def windowed(self) -> bool:
    """Whether training runs the loops as model/windowed.py does (a loop count chosen
    per step, a gradient window) rather than the plain K-loop scan."""
    return self.loop_sampling != "fixed" or self.backprop_loops > 0

  @property
  def max_count(self) -> int:
    """The most loops a training step can run: `loops`, or `max_loops` for a random draw."""
    return self.loops if self.loop_sampling == "fixed" else self.max_loops

  @property
  def gradient_window(self) -> int:
    """Loops with gradient, at most (the windowed scan's static length)."""
    if self.backprop_loops:
      return min(self.backprop_loops, self.max_count)
    return self.max_count

  def trained_loss_loops(self, loops: int) -> tuple[int, ...]:
    """The loops whose losses a training step of `loops` loops averages: the loss type's
    loops (relative to that count) that lie in the gradient window, the last
    min(loops, gradient_window) loops. Without a window, `loss_loops`."""
    if not self.windowed:
      return self.loss_loops(loops)
    first = loops - min(loops, self.gradient_window)
    return tuple(i for i in self.loss_loops(loops) if i >= first)


def config_fields() -> tuple[dataclasses.Field, ...]:
  """ModelConfig's fields that are `config.model` keys (all but the target platform)."""
  return tuple(f for f in dataclasses.fields(ModelConfig) if f.metadata.get("config", True))


def get_config() -> ml_collections.ConfigDict:
  """Defaults for `config.model`: ModelConfig's field defaults."""
  return ml_collections.ConfigDict({f.name: f.default for f in config_fields()})


def resolve_vocab_size(configured: int, tokenizer_vocab_size: int | None) -> int:
  """The model's vocabulary: the configured size, or the tokenizer's when it is 0."""
  if tokenizer_vocab_size is None:
    if configured == 0:
      raise config_error(
        "model.vocab_size",
        0,
        "0 means 'the tokenizer's size', but no tokenizer size was given",
        "pass tokenizer_vocab_size to ModelConfig.from_config or set a size",
      )
    return configured
  if configured == 0:
    return int(tokenizer_vocab_size)
  if configured < tokenizer_vocab_size:
    raise config_error(
      "model.vocab_size",
      configured,
      f"it is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size})",
      "set it to 0 to follow the tokenizer",
    )
  return configured


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the offending field, its value and what is allowed."""
  known = {f.name for f in config_fields()}
  unknown = sorted(set(c.keys()) - known)
  if unknown:
    raise config_error("model", unknown, "has unknown keys", f"use only {sorted(known)}")

  def fail(field, allowed, fix=""):
    raise config_error(f"model.{field}", c[field], allowed, fix)

  for field, allowed in (
    ("variant", VARIANTS),
    ("loss_type", LOSS_TYPES),
    ("loop_sampling", LOOP_SAMPLINGS),
    ("remat", REMAT_PLACES),
    ("dtype", DTYPES),
    ("attention_impl", ATTENTION_IMPLS),
  ):
    if c[field] not in allowed:
      fail(field, f"choose one of {allowed}")
  policy = c.remat_policy
  if not isinstance(policy, str) or (
    policy not in REMAT_POLICIES and set(policy.split(",")) - set(CHECKPOINT_NAMES)
  ):
    fail(
      "remat_policy",
      f"use one of {tuple(REMAT_POLICIES)} or a comma-separated list of {CHECKPOINT_NAMES}",
    )
  for field in ("loops", "n_layer", "d_model", "n_head", "n_kv_head", "vocab_pad_multiple"):
    if not _positive_int(c[field]):
      fail(field, "must be an integer >= 1")
  for field in ("max_loops", "backprop_loops"):
    if not (_positive_int(c[field]) or c[field] == 0):
      fail(field, "must be an integer >= 0")
  if c.loop_sampling != "fixed" and c.max_loops < c.loops:
    fail(
      "max_loops",
      f"loop_sampling={c.loop_sampling!r} draws up to max_loops loops, which must be >= "
      f"loops={c.loops}",
      f"set model.max_loops (e.g. {2 * c.loops})",
    )
  if not (_positive_int(c.vocab_size) or c.vocab_size == 0):
    fail("vocab_size", "must be an integer >= 1, or 0 for the tokenizer's size")
  if not isinstance(c.seq_len, int) or c.seq_len < 2:
    fail("seq_len", "must be an integer >= 2")
  if c.d_model % c.n_head:
    fail("n_head", f"must divide d_model={c.d_model} (head_dim = d_model / n_head)")
  if c.n_head % c.n_kv_head:
    fail("n_kv_head", f"must divide n_head={c.n_head} (grouped-query attention)")
  if (c.d_model // c.n_head) % 2:
    fail("n_head", f"gives an odd head_dim={c.d_model // c.n_head}; rotary needs an even one")
  if c.kv_lora_rank < 0:
    fail("kv_lora_rank", "must be 0 (standard attention) or a positive MLA rank")
  pattern = c.window_pattern
  if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - {"S", "L"}:
    fail(
      "window_pattern",
      "must be a non-empty string of 'S' (window seq_len//4) and 'L' (full), e.g. 'SSSL'",
    )
  if c.rope_max_len and c.rope_max_len < c.seq_len:
    fail(
      "rope_max_len",
      f"the rotary table is shorter than seq_len={c.seq_len}",
      "raise it or set 0 (= 10*seq_len)",
    )
  if not c.softcap > 0:
    fail("softcap", "must be > 0")
  for field in ("attention_block_q", "attention_block_kv"):
    if not (_positive_int(c[field]) or c[field] == 0):
      fail(field, "must be 0 (the kernel's default) or a positive block size")
  for field in ("rope_bf16", "separate_documents", "unroll_layers"):
    if not isinstance(c[field], bool):
      fail(field, "must be True or False")
