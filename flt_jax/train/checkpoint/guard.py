"""The config-compatibility guard: a workdir's checkpoints fit only a model of the same
shape, so a run whose shape differs is refused before anything is restored or written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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
    raise ValueError(
      "The checkpoints in this workdir were written by a model with a different shape:\n  "
      + "\n  ".join(diffs)
      + "\nUse a new --workdir for the new model, or restore the saved values "
      "(e.g. --config.model.<field>=<saved value>)."
    )
