"""LT_ia with 12 loops (presets: cpu (default), multihop, paper; see base.py)."""

from experiments import base


def get_config(preset=None):
  return base.make("LT_ia", 12, preset)
