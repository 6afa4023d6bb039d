"""LT with 6 loops (presets: cpu (default), multihop, paper; see flt_jax/presets.py)."""

from flt_jax import presets


def get_config(preset=None):
  return presets.make("LT", 6, preset)
