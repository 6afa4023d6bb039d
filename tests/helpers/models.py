"""Tiny models for tests: one config builder, and random params with the model's tree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flt_jax.model.config import ModelConfig, get_config
from flt_jax.model.looped import LoopedTransformer


def model_config(**fields) -> ModelConfig:
  """config.model's defaults with `fields` set, validated as a run validates them."""
  c = get_config()
  c.update(fields)
  return ModelConfig.from_config(c)


def random_params(
  cfg: ModelConfig,
  seed: int = 0,
  std: float = 0.3,
  *,
  embedding_std: float | None = None,
  head_std: float | None = None,
):
  """Params of LoopedTransformer(cfg), every matrix drawn from N(0, std) (the init's zero
  c_proj would make each block the identity and hide bugs); the embedding and lm_head
  from N(0, embedding_std) and N(0, head_std) when given. Leaves are drawn in tree order
  from numpy's generator `seed`, so the values depend only on (cfg shapes, seed, stds)."""
  shapes = jax.eval_shape(
    LoopedTransformer(cfg).init, jax.random.key(0), jnp.zeros([1, 8], jnp.int32)
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    scale = std
    if "wte" in name and embedding_std is not None:
      scale = embedding_std
    elif "lm_head" in name and head_std is not None:
      scale = head_std
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))
