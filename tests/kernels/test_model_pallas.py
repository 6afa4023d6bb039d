"""The whole model with attention_impl='pallas' (Pallas interpreter on CPU) equals 'xla':
same logits, same losses over three training steps (Muon + AdamW), for FLT and LT, with
GQA and a sliding-window layer, in float32."""

import functools

import jax
import numpy as np
import pytest

from flt_jax.model.looped import LoopedTransformer
from flt_jax.train import config as train_config
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train import step as step_lib
from tests.helpers.models import model_config

B, T, VOCAB = 2, 64, 96


def _model(variant: str, impl: str) -> LoopedTransformer:
  cfg = model_config(
    vocab_size=VOCAB,
    variant=variant,
    n_layer=2,
    d_model=128,
    n_head=2,  # head_dim 64
    n_kv_head=1,  # GQA 2:1
    loops=2,
    seq_len=T,
    window_pattern="SL",  # layer 0 has window T // 4, layer 1 full context
    loss_type="STEP",
    attention_impl=impl,
  )
  return LoopedTransformer(cfg)


def _batches(n: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(n, B, T + 1)).astype(np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


@functools.cache
def _run(variant: str, impl: str):
  """(logits at the initial params, losses of three training steps)."""
  model = _model(variant, impl)
  optimizer = optim_lib.make_optimizer(train_config.get_optim_config(), d_model=128, total_steps=10)
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), T)
  # Non-zero output projections so that attention reaches the logits from the start.
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  state = state.replace(params=params, opt_state=optimizer.init(params))
  batches = _batches(3)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  logits = forward.lower(state.params, batches[0]["inputs"]).compile()(
    state.params, batches[0]["inputs"]
  )
  step = (
    jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer))
    .lower(state, batches[0])
    .compile()
  )
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.asarray(logits), np.asarray(losses)


@pytest.mark.parametrize("variant", ["FLT", "LT"])
def test_pallas_model_matches_xla(variant):
  logits_xla, losses_xla = _run(variant, "xla")
  logits_pallas, losses_pallas = _run(variant, "pallas")
  assert np.all(np.isfinite(losses_xla)) and losses_xla[0] != losses_xla[-1]
  np.testing.assert_allclose(logits_pallas, logits_xla, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(losses_pallas, losses_xla, atol=1e-4, rtol=1e-4)
