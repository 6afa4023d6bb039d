"""Train step: accumulation equals one large batch, non-finite updates are skipped."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flt_jax.model import loop_count
from flt_jax.model.looped import LoopedTransformer
from flt_jax.train import config as train_config
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train import step as step_lib
from tests.helpers.models import model_config


def _model(**overrides):
  shape = dict(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, seq_len=8)
  return LoopedTransformer(model_config(**{**shape, "loops": 2, "loss_type": "STEP", **overrides}))


def _batch(B, T=8, seed=0, ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, size=(B, T + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[rng.random(targets.shape) < ignore_frac] = -1  # uneven valid counts per row
  return {"inputs": tokens[:, :-1], "targets": targets}


def _state(model, optimizer):
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), 8)
  # Perturb the zero-initialised projections so every parameter gets a gradient.
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  return state.replace(params=params, opt_state=optimizer.init(params))


def test_accumulated_micro_batches_equal_one_large_batch():
  num_micro = 4
  model = _model()
  optimizer = optim_lib.make_optimizer(
    train_config.get_optim_config(), d_model=32, total_steps=10
  )  # Muon + AdamW, clipped
  state = _state(model, optimizer)
  batch = _batch(8)
  step = lambda n: jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=optimizer, num_micro=n)
  )
  one, m1 = step(1)(state, batch)
  many, mn = step(num_micro)(state, batch)
  np.testing.assert_allclose(m1["loss"], mn["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], mn["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(many.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert int(one.step) == int(many.step) == 1


def test_batch_that_does_not_split_is_a_clear_error():
  model = _model()
  optimizer = optax.sgd(1e-2)
  state = _state(model, optimizer)
  with pytest.raises(ValueError, match="micro-batches"):
    step_lib.train_step(state, _batch(6), model=model, optimizer=optimizer, num_micro=4)


def test_nonfinite_update_is_skipped_and_counted():
  model = _model()
  optimizer = optax.sgd(1e-2)
  state = _state(model, optimizer)
  bad = jax.tree_util.tree_map(lambda x: x, state.params)
  bad["lm_head"]["kernel"] = bad["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  state = state.replace(params=bad)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer))
  new, metrics = step(state, _batch(4))
  assert not bool(metrics["finite"])
  assert int(new.step) == 0 and int(new.nonfinite_in_a_row) == 1
  assert int(new.nonfinite_total) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(bad)):
    np.testing.assert_array_equal(a, b)  # untouched, NaN included
  new2, _ = step(new, _batch(4, seed=1))
  assert int(new2.nonfinite_in_a_row) == 2


def test_diagnostics_report_every_loop_and_layer():
  model = _model(loops=3)
  optimizer = optax.sgd(1e-2)
  state = _state(model, optimizer)
  _, m = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=optimizer, diagnostics=True)
  )(state, _batch(4))
  assert m["loop_loss"].shape == (3,) and m["residual_norm"].shape == (3,)
  assert m["layer_grad_norm"].shape == (2,)
  np.testing.assert_allclose(jnp.mean(m["loop_loss"]), m["loss"], rtol=1e-5)  # STEP
  assert np.all(np.asarray(m["layer_grad_norm"]) > 0)
  total = np.sqrt(np.sum(np.square(m["layer_grad_norm"])))
  assert total <= float(m["grad_norm"]) + 1e-5  # layers are a part of the whole


def test_tripped_stop_rule_leaves_the_state_unchanged():
  """With max_consecutive_nonfinite=2, two skipped updates in a row trip the rule: every
  later step (finite or not) returns the state as it was, so the host reading it later
  still finds the tripped counters and the step that tripped (step + nonfinite_total)."""
  model = _model()
  optimizer = optax.sgd(1e-2)
  good = _state(model, optimizer)
  bad_params = jax.tree_util.tree_map(lambda x: x, good.params)
  bad_params["lm_head"]["kernel"] = bad_params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  step = jax.jit(
    functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer, max_consecutive_nonfinite=2
    )
  )
  state, _ = step(good, _batch(4))  # one applied update
  state = state.replace(params=bad_params)
  state, _ = step(state, _batch(4, seed=1))
  state, _ = step(state, _batch(4, seed=2))
  assert (int(state.step), int(state.nonfinite_in_a_row), int(state.nonfinite_total)) == (1, 2, 2)
  tripped = state
  state = state.replace(params=good.params)  # a finite update would now be possible
  state, metrics = step(state, _batch(4, seed=3))
  assert bool(metrics["finite"])
  assert (int(state.step), int(state.nonfinite_in_a_row), int(state.nonfinite_total)) == (1, 2, 2)
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(good.params)):
    np.testing.assert_array_equal(a, b)
  assert int(tripped.step + tripped.nonfinite_total) == 3  # the third step tripped it


def test_separate_documents_sends_segments_and_positions_to_the_loss(monkeypatch):
  """With model.separate_documents the step reads the packed rows' segment ids and
  positions and hands each micro-batch's rows to the loss; without it, neither."""
  calls, received = [], []
  real_loss_fn = step_lib.loss_fn

  def recording_loss_fn(params, model, inputs_BxT, targets_BxT, **kwargs):
    documents = [kwargs.pop(k, None) for k in ("segment_ids_BxT", "positions_BxT")]
    calls.append(documents)
    if documents[0] is not None:
      jax.debug.callback(lambda s, p: received.append((np.asarray(s), np.asarray(p))), *documents)
    return real_loss_fn(params, model, inputs_BxT, targets_BxT, **kwargs)

  monkeypatch.setattr(step_lib, "loss_fn", recording_loss_fn)
  batch = _batch(4)
  batch["segment_ids"] = np.repeat(np.arange(1, 5, dtype=np.int32)[:, None], 8, axis=1)
  batch["positions"] = np.tile(np.arange(8, dtype=np.int32), (4, 1)) + 100
  for separate in (False, True):
    model = _model(separate_documents=separate)
    documents = ("segment_ids", "positions") if separate else ()
    assert step_lib.batch_keys(model.cfg) == ("inputs", "targets") + documents
    calls.clear()
    optimizer = optax.sgd(1e-2)
    state = _state(model, optimizer)
    step = functools.partial(step_lib.train_step, model=model, optimizer=optimizer, num_micro=2)
    step_batch = {k: batch[k] for k in step_lib.batch_keys(model.cfg)}
    if separate:
      jax.jit(step)(state, step_batch)
      jax.effects_barrier()
    else:
      jax.eval_shape(step, state, step_batch)  # tracing shows what the loss receives
    assert calls and all((d[0] is not None) == separate for d in calls)
  # Two micro-batches of two rows each, in order.
  assert len(received) == 2
  for m, (segment_ids, positions) in enumerate(received):
    np.testing.assert_array_equal(segment_ids, batch["segment_ids"][2 * m : 2 * m + 2])
    np.testing.assert_array_equal(positions, batch["positions"][2 * m : 2 * m + 2])


def test_random_loop_counts_one_compilation_and_the_host_draws():
  """Each step draws its count from (seed, step + nonfinite_total) inside the one
  compiled step; metrics['loops'] is that count, the host's copy draws the same, and a
  skipped (non-finite) step moves the draw on as the host's step count does."""
  model = _model(loop_sampling="uniform", max_loops=4, backprop_loops=2, loss_type="FEW")
  optimizer = optax.sgd(1e-2)
  state = _state(model, optimizer)
  step = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=optimizer, loop_seed=5)
  )
  counts = []
  for i in range(6):
    state, metrics = step(state, _batch(4, seed=i))
    assert bool(metrics["finite"]) and metrics["residual_norm"].shape == (4,)
    counts.append(int(metrics["loops"]))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(counts, loop_count.draws_on_host(model.cfg, 5, range(6)))
  assert len(set(counts)) > 1
  skipped = state.replace(nonfinite_total=jnp.int32(3))  # host step 6 + 3 = 9
  _, metrics = step(skipped, _batch(4))
  assert int(metrics["loops"]) == int(loop_count.draws_on_host(model.cfg, 5, [9])[0])


@pytest.mark.parametrize("backprop_loops", [0, 1])
def test_fixed_loop_count_reports_no_draw(backprop_loops):
  """A fixed K, with or without a gradient window: nothing drawn, so no count to log (the
  reporter would otherwise redo the draws on the host at every log line)."""
  model = _model(backprop_loops=backprop_loops)
  assert model.cfg.windowed == bool(backprop_loops)
  optimizer = optax.sgd(1e-2)
  _, metrics = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer))(
    _state(model, optimizer), _batch(4)
  )
  assert "loops" not in metrics
