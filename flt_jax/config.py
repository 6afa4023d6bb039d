"""The full config: every section's defaults, and a check that a config has exactly
their keys (a typo in an experiment file fails loudly instead of being ignored).

This module sits with the run layer: it is the one place that knows every section.
"""

from __future__ import annotations

import ml_collections

from flt_jax.data import config as data_config
from flt_jax.errors import config_error
from flt_jax.model import config as model_config
from flt_jax.parallel import config as parallel_config
from flt_jax.train import config as train_config


def default_config() -> ml_collections.ConfigDict:
  config = train_config.get_config()  # optim, train, checkpoint, metrics
  config.model = model_config.get_config()
  config.data = data_config.get_config()
  config.mesh = parallel_config.get_config()  # device mesh, sharding rules, multi-host
  config.experiment = ""
  config.preset = ""
  return config


def with_defaults(saved: dict, reference=None) -> ml_collections.ConfigDict:
  """A config saved with a checkpoint, with each key it lacks (a field added since it was
  saved) taken from the defaults; its own values and any unknown keys are kept, so
  check_keys still refuses what the defaults do not know."""
  reference = default_config() if reference is None else reference

  def fill(values: dict, defaults) -> dict:
    out = dict(values)
    for key, default in defaults.items():
      if key not in out:
        out[key] = default.to_dict() if isinstance(default, ml_collections.ConfigDict) else default
      elif isinstance(default, ml_collections.ConfigDict) and isinstance(out[key], dict):
        out[key] = fill(out[key], default)
    return out

  return ml_collections.ConfigDict(fill(saved, reference))


def check_keys(config, reference=None, path: str = "") -> None:
  """Raises ConfigError for keys missing from `config` or unknown to the defaults."""
  reference = default_config() if reference is None else reference
  have, want = set(config.keys()), set(reference.keys())
  if want - have:
    raise config_error(
      path,
      sorted(want - have),
      "lacks these keys",
      "start from flt_jax/presets.py, which fills in every default",
    )
  if have - want:
    raise config_error(path, sorted(have - want), "has unknown keys", f"use only {sorted(want)}")
  for key in want:
    if isinstance(reference[key], ml_collections.ConfigDict):
      sub = f"{path}.{key}" if path else key
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        raise config_error(sub, config[key], "must be a section", "restore the section's fields")
      check_keys(config[key], reference[key], sub)
