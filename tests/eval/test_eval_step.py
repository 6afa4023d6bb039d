"""Eval step: loss, byte and answer sums over one batch, against a plain recount."""

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
  params = state_lib.init_params(model, jax.random.PRNGKey(0), 8)
  # Perturb the zero-initialised projections so predictions depend on the input.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  batch["answer_mask"] = np.zeros_like(batch["targets"])
  batch["answer_mask"][:, -2:] = 1
  token_bytes = jnp.arange(64, dtype=jnp.int32) % 3 + 1
  sums = eval_step_lib.eval_step(params, batch, token_bytes, model=model)
  assert int(sums["tokens"]) == batch["targets"].size
  assert int(sums["bytes"]) == int(np.sum(np.asarray(token_bytes)[batch["targets"]]))
  assert int(sums["answers"]) == 2
  logits = model.apply({"params": params}, batch["inputs"])
  pred = np.asarray(jnp.argmax(logits, -1))
  expect = sum(bool(np.all(pred[b, -2:] == batch["targets"][b, -2:])) for b in range(2))
  assert int(sums["answers_correct"]) == expect


def test_eval_fn_sends_only_the_arrays_the_step_reads(monkeypatch):
  """Segment ids and positions reach the eval step only with model.separate_documents."""
  from flt_jax.eval import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

  received = []

  def recording_eval_step(params, batch, token_bytes_V, *, model, loops=None):
    received.append(sorted(batch))
    return {"nll": jnp.sum(batch["inputs"] * 0.0), "tokens": jnp.sum(batch["targets"] >= 0)}

  monkeypatch.setattr(eval_lib, "eval_step", recording_eval_step)
  z = np.zeros((2, 8), np.int32)
  batch = {"inputs": z, "targets": z, "segment_ids": z + 1, "positions": z, "extra": z}
  for separate in (False, True):
    c = model_config.get_config()
    c.update(dict(vocab_size=64, d_model=32, n_head=2, separate_documents=separate))
    model = LoopedTransformer(model_config.ModelConfig.from_config(c))
    eval_lib.make_eval_fn(model)(None, batch, jnp.ones(64, jnp.int32), loops=1)
  assert received == [
    ["inputs", "targets"],
    ["inputs", "positions", "segment_ids", "targets"],
  ]
