"""The config-compatibility guard: a workdir's checkpoints fit only a model of the same
shape and the tokenizer they were trained with, so a run whose shape or tokenizer
differs is refused before anything is restored or written."""

from __future__ import annotations

import logging
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
      "The checkpoints in this workdir were written by a model with a different shape ("
      + "; ".join(diffs)
      + "). Use a new --workdir for the new model, or restore the saved values "
      "(e.g. --config.model.<field>=<saved value>)."
    )


def _describe(identity: Mapping) -> str:
  return (
    f"{identity.get('name')} tokenizer, vocab {identity.get('vocab_size')}, separator id "
    f"{identity.get('eos_id')}, sha256 {str(identity.get('sha256'))[:12]}"
  )


def check_tokenizer(saved: Mapping | None, current: Mapping, where) -> None:
  """Raises ValueError when the tokenizer recorded in the checkpoint `where` differs from
  this run's (`Tokenizer.identity()`): the same ids would stand for other text. A
  checkpoint without a record (older versions) is accepted with a warning."""
  if not saved:
    logging.warning(
      "%s records no tokenizer (saved by an older version); not checked that this run's "
      "tokenizer (%s) is the one it was trained with.",
      where,
      _describe(current),
    )
    return
  if saved.get("sha256") != current.get("sha256"):
    raise ValueError(
      f"The checkpoint {where} was trained with another tokenizer (saved: "
      f"{_describe(saved)}; now: {_describe(current)}), so its token ids would stand for "
      "other text. Use the tokenizer it was trained with (the same data.tokenizer, "
      "data.tokenizer_path, and for a trained BPE the same training text: data.path, "
      "data.bpe_train_bytes, data.bpe_vocab_size), or a new --workdir."
    )
