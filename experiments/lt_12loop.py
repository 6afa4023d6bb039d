"""LT with 12 loops (presets: cpu (default), multihop, paper; see base.py)."""

from experiments import base


def get_config(preset=None):
  return base.make("LT", 12, preset)
