"""LT with 9 loops (presets: cpu (default), multihop, paper; see flt_jax/presets.py)."""

from flt_jax import presets


def get_config(preset=None):
  return presets.make("LT", 9, preset)
