"""The config-compatibility guard: a workdir's checkpoints fit only a model of the same
shape and the tokenizer they were trained with, so a run whose shape or tokenizer
differs is refused before anything is restored or written."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from flt_jax.train.checkpoint import messages

# Model fields whose change makes a checkpoint unusable. `loops` and `loss_type` are
# absent on purpose: a checkpoint may be evaluated or fine-tuned at another loop count.
MODEL_SHAPE_FIELDS = (
  "vocab_size",
  "n_layer",
  "d_model",
  "n_head",
  "n_kv_head",
  "kv_lora_rank",
  "variant",
  "window_pattern",
  "seq_len",
)


def config_json(config) -> dict[str, Any]:
  """`config` (a ConfigDict or dict) as a JSON-safe dict: tuples become lists, numpy
  scalars Python numbers, anything else its repr."""

  def convert(obj):
    if isinstance(obj, Mapping):
      return {str(k): convert(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
      return [convert(v) for v in obj]
    if isinstance(obj, np.generic):
      return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
      return obj
    return repr(obj)

  return convert(config.to_dict() if hasattr(config, "to_dict") else config)


def check_compatible(saved_config: Mapping, config: Mapping) -> None:
  """Raises ValueError naming every `model.<field>` of MODEL_SHAPE_FIELDS that differs
  between the saved config and this run's (both as `config_json` gives them)."""
  saved_model, model = saved_config.get("model", {}), config.get("model", {})
  missing = object()
  show = lambda v: "<absent>" if v is missing else repr(v)
  diffs = []
  for field in MODEL_SHAPE_FIELDS:
    a, b = saved_model.get(field, missing), model.get(field, missing)
    if a != b:
      diffs.append(f"model.{field}: saved {show(a)}, now {show(b)}")
  if diffs:
    raise ValueError(messages.other_model_shape(diffs))


def check_tokenizer(saved: Mapping | None, current: Mapping, where) -> None:
  """Raises ValueError when the tokenizer recorded in the checkpoint `where` differs from
  this run's (`Tokenizer.identity()`): the same ids would stand for other text. A
  checkpoint without a record (older versions) is accepted with a warning."""
  if not saved:
    logging.warning(messages.no_tokenizer_recorded(where, current))
    return
  if saved.get("sha256") != current.get("sha256"):
    raise ValueError(messages.other_tokenizer(where, saved, current))
