"""Eval step: loss, byte and answer sums over one batch, against a plain recount."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flt_jax.eval import step as eval_step_lib
from flt_jax.model import config as model_config
from flt_jax.model.looped import LoopedTransformer
from flt_jax.train import state as state_lib


def _model():
  c = model_config.get_config()
  c.update(dict(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, loops=2, seq_len=8))
  return LoopedTransformer(model_config.ModelConfig.from_config(c))


def test_eval_step_counts_bytes_and_answers():
  model = _model()
  # The init's shapes with random values (its zero projections would ignore the input).
  shapes = nn.meta.unbox(state_lib.abstract_params(model, jax.random.PRNGKey(0), 8))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32), shapes)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  batch["answer_mask"] = np.zeros_like(batch["targets"])
  batch["answer_mask"][:, -2:] = 1
  token_bytes = jnp.arange(64, dtype=jnp.int32) % 3 + 1
  step = jax.jit(functools.partial(eval_step_lib.eval_step, model=model))
  sums = step(params, batch, token_bytes)
  assert int(sums["tokens"]) == batch["targets"].size
  assert int(sums["bytes"]) == int(np.sum(np.asarray(token_bytes)[batch["targets"]]))
  assert int(sums["answers"]) == 2
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"])
  pred = np.asarray(jnp.argmax(logits, -1))
  expect = sum(bool(np.all(pred[b, -2:] == batch["targets"][b, -2:])) for b in range(2))
  assert int(sums["answers_correct"]) == expect
