"""FLT trained with a random loop count per step (issue 22): Poisson-lognormal counts of
mean 6 (Huginn's recipe, arXiv 2502.05171), clipped to 1..16, with gradient through the
last 4 loops only. Evaluation and generation default to K=6. Presets as in
flt_jax/presets.py; `:multihop` is the measured one (README, Random loop counts)."""

from flt_jax import presets


def get_config(preset=None):
  c = presets.make("FLT", 6, preset)
  c.experiment = "FLT_random"
  c.model.loop_sampling = "poisson_lognormal"
  c.model.max_loops = 16
  c.model.backprop_loops = 4
  return c
