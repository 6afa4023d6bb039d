"""A traced loop count with a gradient window (model/windowed.py, loss_fn(loop_count=)):
the fixed-K model at K = n when every loop has gradient, a plain stop_gradient reference
when only the last k do, one compilation for every count, and memory bounded by k."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model.config import ModelConfig
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import loss_fn
from tests.helpers import reference
from tests.helpers.models import model_config, random_params

VARIANTS = ("FLT", "FLT_res", "LT", "LT_i", "LT_ia")
B, T, VOCAB = 2, 8, 40
BASE = dict(
  n_layer=2, d_model=32, n_head=2, n_kv_head=2, vocab_size=VOCAB, seq_len=T, loops=3, max_loops=6
)


def make_cfg(**overrides) -> ModelConfig:
  return model_config(**{**BASE, **overrides})


@functools.cache
def params_for(cfg: ModelConfig, seed=0):
  """Every matrix non-zero (zero-initialised projections would hide gradients)."""
  return random_params(cfg, seed, 0.1, embedding_std=1.0)


def batch(seed=0):
  rng = np.random.default_rng(10 + seed)
  toks = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
  targets = toks[:, 1:].copy()
  targets[0, :3] = -1  # ignored targets carry no loss
  return jnp.asarray(toks[:, :-1]), jnp.asarray(targets)


@functools.cache
def windowed_grad(cfg: ModelConfig, diagnostics=False):
  """jitted (params, x, y, count) -> ((loss, aux), grads): the count is traced."""
  model = LoopedTransformer(cfg)
  fn = lambda p, x, y, n: loss_fn(p, model, x, y, loop_count=n, diagnostics=diagnostics)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


@functools.cache
def fixed_grad(cfg: ModelConfig, loops: int, diagnostics=False):
  model = LoopedTransformer(cfg)
  fn = lambda p, x, y: loss_fn(p, model, x, y, loops=loops, diagnostics=diagnostics)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


def assert_trees_close(got, want, rel=1e-5, what=""):
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)
  ):
    scale = max(float(jnp.abs(w).max()), 1e-12)
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), atol=rel * scale, rtol=0, err_msg=f"{what} {path}"
    )


# ---------------------------------------------------------------------------
# The plain jax.numpy model (tests/helpers/reference.py), its h after loop n - k - 1
# stop_gradient'ed by hand.


def reference_loss(params, cfg, toks, targets, n, k, loss_loops):
  """Mean loss over `loss_loops` of the plain n-loop model whose first n - k loops are
  stop_gradient'ed (k >= n: none)."""
  states = reference.loop_states(params, cfg, toks, n, no_gradient_through=max(n - k, 0))
  valid = targets != -1
  losses = []
  for i in loss_loops:
    logits = reference.head_logits(params, cfg, states[i])
    nll = (
      jax.nn.logsumexp(logits, -1)
      - jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    )
    losses.append(jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid))
  return jnp.mean(jnp.stack(losses))


# cfg, n, k and the loss loops are static
REFERENCE = jax.jit(jax.value_and_grad(reference_loss), static_argnums=(1, 4, 5, 6))


def expected_loss_loops(loss_type, n, k):
  """The placements relative to n, inside the window of the last min(n, k) loops."""
  first = {"END": n - 1, "STEP": 0, "FEW": 2 * n // 3}[loss_type]
  return tuple(i for i in range(n) if i >= first and i >= n - k)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["END", "STEP", "FEW"])
def test_every_loop_with_gradient_equals_the_fixed_model_at_k_equal_n(loss_type):
  """backprop_loops=0: the window is max_loops long, so count n is the fixed-K model at
  K = n (loss and every gradient), one compilation for every n."""
  cfg = make_cfg(loss_type=loss_type, loop_sampling="uniform", max_loops=5)
  fixed_cfg = make_cfg(loss_type=loss_type)
  params, (x, y) = params_for(fixed_cfg), batch()
  step = windowed_grad(cfg)
  for n in (1, 3, 5):
    (loss, aux), grads = step(params, x, y, jnp.int32(n))
    (want_loss, want_aux), want_grads = fixed_grad(fixed_cfg, n)(params, x, y)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-6, err_msg=f"n={n}")
    assert_trees_close(grads, want_grads, what=f"n={n}")
    rn = np.asarray(aux["residual_norm"])
    assert rn.shape == (5,) and np.all(rn[n:] == 0)
    np.testing.assert_allclose(rn[:n], want_aux["residual_norm"], rtol=1e-5)
  assert step._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "variant,loss_type,remat",
  [(v, "END", "none") for v in VARIANTS]
  + [("FLT", "STEP", "block"), ("FLT", "FEW", "loop"), ("LT", "STEP", "loop")],
)
def test_gradient_window_equals_a_stop_gradient_reference(variant, loss_type, remat):
  """backprop_loops=k: the gradient of the plain model whose first n - k loops are
  stop_gradient'ed, for counts below, at and above k (one compiled function)."""
  k = 2
  cfg = make_cfg(
    variant=variant,
    loss_type=loss_type,
    remat=remat,
    loop_sampling="uniform",
    max_loops=4,
    backprop_loops=k,
  )
  params, (x, y) = params_for(make_cfg(variant=variant)), batch(1)
  step = windowed_grad(cfg)
  for n in (1, 4):  # empty window slots; a gradient-free prefix of 2 loops
    (loss, _), grads = step(params, x, y, jnp.int32(n))
    loss_loops = expected_loss_loops(loss_type, n, k)
    want_loss, want_grads = REFERENCE(params, cfg, x, y, n, k, loss_loops)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, err_msg=f"n={n}")
    assert_trees_close(grads, want_grads, rel=2e-5, what=f"{variant} n={n}")
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_the_reference_window_changes_the_gradient():
  """What the comparisons above rest on: the stop_gradient'ed reference's block gradients
  differ from the all-loop gradients once the count exceeds k."""
  cfg = make_cfg(loss_type="END", loop_sampling="uniform", max_loops=4, backprop_loops=2)
  params, (x, y) = params_for(make_cfg()), batch(1)
  loss_loops = expected_loss_loops("END", 4, 2)
  _, window_grads = REFERENCE(params, cfg, x, y, 4, 2, loss_loops)
  _, full_grads = REFERENCE(params, cfg, x, y, 4, 4, loss_loops)
  window = jax.tree_util.tree_leaves(window_grads["blocks"])
  full = jax.tree_util.tree_leaves(full_grads["blocks"])
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(window, full)) > 1e-4


def test_diagnostics_report_every_loop_run_including_the_gradient_free_ones():
  """Per-loop losses and residual norms of all n loops (prefix ones from the while
  loop), zeros past n: the fixed model's at K = n."""
  cfg = make_cfg(loss_type="STEP", loop_sampling="uniform", max_loops=6, backprop_loops=2)
  fixed_cfg = make_cfg(loss_type="STEP")
  params, (x, y) = params_for(fixed_cfg), batch(2)
  (_, aux), _ = windowed_grad(cfg, diagnostics=True)(params, x, y, jnp.int32(5))
  (_, want), _ = fixed_grad(fixed_cfg, 5, diagnostics=True)(params, x, y)
  for name in ("loop_loss", "residual_norm"):
    got = np.asarray(aux[name])
    assert got.shape == (6,) and got[5] == 0, name
    np.testing.assert_allclose(got[:5], want[name], rtol=1e-5, err_msg=name)


def test_fixed_count_with_a_window_trains_the_last_k_loops_only():
  """loop_sampling=fixed with backprop_loops: every step runs `loops`, the window's
  gradient; the count is passed as a constant."""
  cfg = make_cfg(loops=4, backprop_loops=2, loss_type="END")
  assert cfg.windowed and cfg.max_count == 4 and cfg.gradient_window == 2
  params, (x, y) = params_for(make_cfg()), batch()
  (loss, _), grads = windowed_grad(cfg)(params, x, y, 4)
  want_loss, want_grads = REFERENCE(params, cfg, x, y, 4, 2, (3,))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  assert_trees_close(grads, want_grads, rel=2e-5)


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_backprop_window_bounds_memory_by_k_not_by_the_count():
  """Temporary memory of the compiled loss-and-gradient at a sampled count of 24 with
  backprop_loops=4 is within 1.2x of the fixed K=4 model's (and far below K=24's)."""
  shapes = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=2, seq_len=64, vocab_size=64)
  bsz = 8
  toks = jnp.zeros((bsz, 64), jnp.int32)

  def grad_fn(cfg, **kwargs):
    model = LoopedTransformer(cfg)
    return jax.grad(lambda p, x: loss_fn(p, model, x, x, **kwargs)[0])

  fixed4 = make_cfg(**shapes, loops=4, max_loops=0)
  boxed = jax.eval_shape(LoopedTransformer(fixed4).init, jax.random.PRNGKey(0), toks)
  params = jax.tree_util.tree_map(
    lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(boxed["params"])
  )
  random = make_cfg(**shapes, loops=12, max_loops=24, loop_sampling="uniform", backprop_loops=4)
  fixed24 = make_cfg(**shapes, loops=24, max_loops=0)
  count = jnp.int32(24)
  window = _temp_bytes(lambda p, x, n: grad_fn(random, loop_count=n)(p, x), params, toks, count)
  k4 = _temp_bytes(grad_fn(fixed4, loops=4), params, toks)
  k24 = _temp_bytes(grad_fn(fixed24, loops=24), params, toks)
  assert window <= 1.2 * k4, (window, k4, k24)
  assert k24 > 3 * k4  # the comparison can fail: stored activations grow with K
