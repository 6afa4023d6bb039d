"""Fully Looped Transformers in JAX/Flax. Importing the package first starts jax quietly on
machines without the accelerators whose plugins are installed (quiet_start.py)."""

from flt_jax import quiet_start as _quiet_start

_quiet_start.start()
