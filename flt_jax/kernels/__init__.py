"""Attention kernels below the model: our Pallas flash attention and the platforms' fused
kernels (splash on TPU, cuDNN on GPU), all with the signature of `model.attention.attend`
plus static block sizes / windows. This package never imports flt_jax.model."""

from flt_jax.kernels.flash import (
  LOWERINGS,
  UnsupportedAttentionError,
  default_lowering,
  flash_attention,
  lowering_for,
)
from flt_jax.kernels.fused import cudnn_attention, splash_attention

__all__ = [
  "LOWERINGS",
  "UnsupportedAttentionError",
  "cudnn_attention",
  "default_lowering",
  "flash_attention",
  "lowering_for",
  "splash_attention",
]
