"""Shared pytest setup: float32 matmuls on CPU so numeric comparisons are tight."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
