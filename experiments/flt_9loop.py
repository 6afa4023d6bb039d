"""FLT with 9 loops (presets: cpu (default), multihop, paper; see base.py)."""

from experiments import base


def get_config(preset=None):
  return base.make("FLT", 9, preset)
