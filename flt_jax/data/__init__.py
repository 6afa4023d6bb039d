"""Data: embedded/real sources, tokenizers, grain pipelines (see pipeline.py)."""

from flt_jax.data.config import get_config, validate
from flt_jax.data.pipeline import (
  Pipeline,
  checkpoint_args_restore,
  checkpoint_args_save,
  make_packed_rows,
  make_pipeline,
  make_tokenizer,
)
from flt_jax.data.tokenizers import Tokenizer

__all__ = [
  "Pipeline",
  "Tokenizer",
  "checkpoint_args_restore",
  "checkpoint_args_save",
  "get_config",
  "make_packed_rows",
  "make_pipeline",
  "make_tokenizer",
  "validate",
]
