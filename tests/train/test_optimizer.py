"""Tests for flt_jax.train.optimizer."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flt_jax.train import config as train_config
from flt_jax.train import optimizer as opt_lib
from tests.helpers.models import model_config

L, D, V = 3, 8, 24
TOTAL = 10


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 5)
  return {
    "wte": {"embedding": jax.random.normal(k[0], (V, D))},
    "lm_head": {"kernel": 0.01 * jax.random.normal(k[1], (D, V))},
    "blocks": {
      "layers": {
        "attn": {"c_q": jax.random.normal(k[2], (L, D, D))},
        "mlp": {
          "c_fc": jax.random.normal(k[3], (L, D, 4 * D)),
          "c_proj": jax.random.normal(k[4], (L, 4 * D, D)),
        },
      },
    },
  }


def _grads(step, scale=1e-2):
  """Deterministic grads with global norm well below the clip of 1."""
  p = _params(100 + step)
  return jax.tree.map(lambda x: scale * x / jnp.sqrt(x.size), p)


def _optim_config(**overrides):
  c = train_config.get_config().optim
  for k, v in overrides.items():
    c[k] = v
  return c


def _reference_ns(g, steps=5, eps=1e-7):
  """Reference Newton-Schulz (nanochat zeropower_via_newtonschulz5), numpy."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = np.asarray(g, np.float64)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    m = x @ x.T
    x = a * x + (b * m + c * m @ m) @ x
  return x.T if transposed else x


# ---------------------------------------------------------------- schedules


def test_lr_multiplier_values():
  f = lambda s, w=0: opt_lib.lr_multiplier(s, 1000, w, 0.2)
  assert f(0) == 1.0
  assert f(500) == 1.0
  assert f(800) == 1.0  # Last constant step: 1000 - 200.
  assert f(801) == pytest.approx(199 / 200)
  assert f(900) == pytest.approx(0.5)
  assert f(999) == pytest.approx(1 / 200)
  assert f(1000) == 0.0
  assert f(1200) == 0.0
  assert f(0, 10) == pytest.approx(0.1)
  assert f(4, 10) == pytest.approx(0.5)
  assert f(9, 10) == pytest.approx(1.0)
  assert f(10, 10) == 1.0
  # The JAX path (used inside the optimizer) agrees with the Python path.
  for s in (0, 4, 9, 500, 801, 900, 999, 1000):
    assert float(opt_lib.lr_multiplier(jnp.int32(s), 1000, 10, 0.2)) == pytest.approx(
      f(s, 10), abs=1e-6
    )
  assert opt_lib.lr_multiplier(5, 10, 0, 0.0) == 1.0  # No warm-down.
  # A horizon too short for a warm-down step: past it the multiplier is 0 on both paths
  # (a resumed run asks for steps beyond a shortened horizon).
  for s in (2, 40):
    assert opt_lib.lr_multiplier(s, 1, 0, 0.2) == 0.0
    assert float(opt_lib.lr_multiplier(jnp.int32(s), 1, 0, 0.2)) == 0.0


def test_muon_momentum_values():
  assert opt_lib.muon_momentum(0) == pytest.approx(0.85)
  assert opt_lib.muon_momentum(150) == pytest.approx(0.90)
  assert opt_lib.muon_momentum(300) == pytest.approx(0.95)
  assert opt_lib.muon_momentum(10_000) == pytest.approx(0.95)
  assert float(opt_lib.muon_momentum(jnp.int32(75))) == pytest.approx(0.875)
  assert opt_lib.muon_momentum(3, 0.5, 0.9, 0) == pytest.approx(0.9)


def test_current_learning_rates():
  c = _optim_config()
  d_model = 384
  lrs = opt_lib.current_learning_rates(c, d_model, 900, 1000)
  scale = (384 / 768) ** -0.5
  assert lrs["lr/muon"] == pytest.approx(0.02 * 0.5)
  assert lrs["lr/embedding"] == pytest.approx(0.2 * scale * 0.5)
  assert lrs["lr/lm_head"] == pytest.approx(0.004 * scale * 0.5)
  assert lrs["optim/muon_momentum"] == pytest.approx(0.95)
  assert all(isinstance(v, float) for v in lrs.values())


def test_resolve_total_steps():
  t = train_config.get_config().train
  t.steps = 123
  assert opt_lib.resolve_total_steps(t, 10**6, 1000) == 123
  t.steps = -1
  t.tokens_per_param = 20
  assert opt_lib.resolve_total_steps(t, 1000, 3000) == math.ceil(20000 / 3000)
  assert opt_lib.resolve_total_steps(t, 1000, 20000) == 1
  with pytest.raises(ValueError, match="train.steps"):
    opt_lib.resolve_total_steps(t, 0, 1000)


# ---------------------------------------------------------------- labels


def test_param_labels():
  labels = opt_lib.param_labels(_params())
  assert labels["wte"]["embedding"] == "adamw"
  assert labels["lm_head"]["kernel"] == "adamw"
  block_labels = jax.tree.leaves(labels["blocks"])
  assert block_labels and set(block_labels) == {"muon"}
  bad = dict(_params(), pos_emb={"embedding": jnp.zeros((4, D))})
  with pytest.raises(ValueError, match=r"pos_emb.*'blocks'"):
    opt_lib.param_labels(bad)
  bad_rank = dict(_params(), blocks={"x": jnp.zeros((2, 2, 2, 2))})
  with pytest.raises(ValueError, match=r"\[L, in, out\]"):
    opt_lib.param_labels(bad_rank)


# ---------------------------------------------------------------- muon


def _per_layer_reference_tx(c, total):
  """optax muon on a single 2-D [in, out] matrix with the same schedules."""
  mult = lambda n: opt_lib.lr_multiplier(n, total, c.warmup_steps, c.warmdown_frac)
  return optax.inject_hyperparams(
    optax.contrib.muon, static_args=("ns_steps",), hyperparam_dtype=jnp.float32
  )(
    learning_rate=lambda n: c.matrix_lr * mult(n),
    beta=lambda n: opt_lib.muon_momentum(
      n, c.muon_momentum_start, c.muon_momentum_end, c.muon_momentum_warmup_steps
    ),
    ns_steps=c.ns_steps,
    eps=opt_lib.MUON_NS_EPS,
    nesterov=True,
  )


def test_muon_stacked_equals_per_layer():
  c = _optim_config(warmdown_frac=0.5, muon_momentum_warmup_steps=4)
  params = _params()
  tx = opt_lib.make_optimizer(c, d_model=D, total_steps=TOTAL)
  state = tx.init(params)
  update = jax.jit(tx.update)

  leaves = {
    "c_q": lambda t: t["blocks"]["layers"]["attn"]["c_q"],
    "c_fc": lambda t: t["blocks"]["layers"]["mlp"]["c_fc"],
    "c_proj": lambda t: t["blocks"]["layers"]["mlp"]["c_proj"],
  }
  ref_tx = _per_layer_reference_tx(c, TOTAL)
  ref_update = jax.jit(ref_tx.update)
  ref_states = {
    (name, l): ref_tx.init({"w": get(params)[l]}) for name, get in leaves.items() for l in range(L)
  }
  for step in range(3):
    grads = _grads(step)
    updates, state = update(grads, state, params)
    for name, get in leaves.items():
      stacked = np.asarray(get(updates))
      for l in range(L):
        ref_u, ref_states[(name, l)] = ref_update(
          {"w": get(grads)[l]}, ref_states[(name, l)], {"w": get(params)[l]}
        )
        np.testing.assert_allclose(
          stacked[l],
          np.asarray(ref_u["w"]),
          # float32 Newton-Schulz amplifies rounding: batched and per-matrix matmuls
          # sum in different orders (seen up to 4e-7 on entries of ~1e-2)
          rtol=1e-5,
          atol=1e-6,
          err_msg=f"{name} layer {l} step {step}",
        )
    # Independent check of the first step against the reference algorithm:
    # -lr * sqrt(max(1, out/in)) * NS(g) per layer (momentum mix ∝ g at t=1).
    if step == 0:
      for get in leaves.values():
        g = np.asarray(get(grads))
        fan_in, fan_out = g.shape[1], g.shape[2]
        for l in range(L):
          expected = -c.matrix_lr * max(1.0, fan_out / fan_in) ** 0.5 * _reference_ns(g[l])
          np.testing.assert_allclose(np.asarray(get(updates))[l], expected, rtol=2e-4, atol=1e-6)
        # Orthogonalising the flattened tensor would give something else.
        flat = _reference_ns(g.reshape(-1, fan_out)).reshape(g.shape)
        assert not np.allclose(
          np.asarray(get(updates)) / -c.matrix_lr / max(1.0, fan_out / fan_in) ** 0.5,
          flat,
          atol=1e-3,
        )

  hp = opt_lib.muon_hyperparams(state)
  # After 3 updates the last one used count 2.
  assert float(hp["beta"]) == pytest.approx(opt_lib.muon_momentum(2, 0.85, 0.95, 4))
  assert float(hp["learning_rate"]) == pytest.approx(0.02 * opt_lib.lr_multiplier(2, TOTAL, 0, 0.5))


def test_muon_lr_follows_schedule_to_zero():
  c = _optim_config(warmdown_frac=0.5)
  params = _params()
  tx = opt_lib.make_optimizer(c, d_model=D, total_steps=4)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(4):
    updates, state = update(_grads(step), state, params)
    lrs = opt_lib.current_learning_rates(c, D, step, 4)
    assert float(opt_lib.muon_hyperparams(state)["learning_rate"]) == pytest.approx(lrs["lr/muon"])
  # Past the horizon the multiplier is 0: every group's update is zero.
  updates, state = update(_grads(4), state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


# ---------------------------------------------------------------- adamw


def test_adamw_groups_lr_and_betas():
  c = _optim_config()
  d_model = 384
  params = _params()
  tx = opt_lib.make_optimizer(c, d_model=d_model, total_steps=TOTAL)
  state = tx.init(params)
  grads = _grads(0)
  update = jax.jit(tx.update)
  updates, state = update(grads, state, params)
  scale = (d_model / 768) ** -0.5
  # First Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
  for key, sub, lr in (("wte", "embedding", 0.2), ("lm_head", "kernel", 0.004)):
    g = np.asarray(grads[key][sub], np.float64)
    np.testing.assert_allclose(
      np.asarray(updates[key][sub]), -lr * scale * g / (np.abs(g) + 1e-10), rtol=1e-4
    )
  # Second step vs a hand-written AdamW(b1=0.8, b2=0.95).
  grads2 = _grads(1)
  updates2, _ = update(grads2, state, params)
  g1, g2 = (np.asarray(x["wte"]["embedding"], np.float64) for x in (grads, grads2))
  b1, b2 = 0.8, 0.95
  m = (1 - b1) * (b1 * g1 + g2)
  v = (1 - b2) * (b2 * g1**2 + g2**2)
  expected = -0.2 * scale * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + 1e-10)
  np.testing.assert_allclose(np.asarray(updates2["wte"]["embedding"]), expected, rtol=1e-4)


def test_global_clip_before_split():
  """A huge 'blocks' gradient must shrink the AdamW groups' gradients too."""
  c = _optim_config()
  params = _params()
  tx = opt_lib.make_optimizer(c, d_model=D, total_steps=TOTAL)
  state = tx.init(params)
  g1 = _grads(0)
  g1["blocks"] = jax.tree.map(lambda x: 1e4 * x, g1["blocks"])
  g2 = _grads(1)  # Small: not clipped.
  update = jax.jit(tx.update)
  _, state = update(g1, state, params)
  u2, _ = update(g2, state, params)

  def clipped(tree):
    n = optax.tree.norm(tree)
    return jax.tree.map(lambda x: x * jnp.minimum(1.0, 1.0 / n), tree)

  def adamw_ref(grad_seq):
    ref = optax.adamw(0.2 * (D / 768) ** -0.5, b1=0.8, b2=0.95, eps=1e-10, weight_decay=0.0)
    s = ref.init(params["wte"])
    for g in grad_seq:
      u, s = ref.update(g["wte"], s, params["wte"])
    return np.asarray(u["embedding"])

  np.testing.assert_allclose(
    np.asarray(u2["wte"]["embedding"]), adamw_ref([clipped(g1), clipped(g2)]), rtol=1e-4
  )
  assert not np.allclose(np.asarray(u2["wte"]["embedding"]), adamw_ref([g1, g2]), rtol=1e-2)


def test_config_validation_messages():
  cfg = train_config.get_config()
  train_config.validate(cfg)
  cfg.model = ml_collections.ConfigDict({"seq_len": 1024})
  train_config.validate(cfg)
  assert train_config.grad_accum_steps(cfg) == 524_288 // (32 * 1024)
  cfg.train.total_batch_tokens = 1000
  with pytest.raises(
    ValueError,
    match=r"train.total_batch_tokens=1000.*"
    r"32 \* 1024 = 32768",
  ):
    train_config.validate(cfg)
  cfg = train_config.get_config()
  cfg.optim.adam_b2 = 1.5
  with pytest.raises(ValueError, match=r"optim.adam_b2=1.5.*< 1"):
    train_config.validate(cfg)
  cfg = train_config.get_config()
  cfg.checkpoint = ml_collections.ConfigDict({"every_steps": 10, "keep": 1, "async_save": "yes"})
  with pytest.raises(ValueError, match="checkpoint.async_save"):
    train_config.validate(cfg)
  cfg = train_config.get_config()
  del cfg["metrics"]
  with pytest.raises(ValueError, match=r"config.metrics=None is invalid: the section is missing"):
    train_config.validate(cfg)


@pytest.mark.parametrize("kv_lora_rank", [0, 8])
def test_labels_on_the_real_model_tree(kv_lora_rank):
  """Muon gets exactly the block matrices, AdamW exactly embedding and lm_head."""
  from flt_jax.model.looped import LoopedTransformer  # pylint: disable=g-import-not-at-top
  from flt_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  shape = dict(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, seq_len=8)
  model = LoopedTransformer(model_config(**shape, kv_lora_rank=kv_lora_rank))
  params = jax.eval_shape(lambda: state_lib.init_params(model, jax.random.PRNGKey(0), 8))
  labels = {
    jax.tree_util.keystr(p): l
    for p, l in jax.tree_util.tree_leaves_with_path(opt_lib.param_labels(params))
  }
  adamw = sorted(k for k, l in labels.items() if l == opt_lib.ADAMW)
  assert adamw == ["['lm_head']['kernel']", "['wte']['embedding']"]
  muon = sorted(k for k, l in labels.items() if l == opt_lib.MUON)
  names = ["c_kv_down", "c_k_up", "c_v_up"] if kv_lora_rank else ["c_k", "c_v"]
  expected = sorted(
    [f"['blocks']['layers']['block']['attn']['{n}']['kernel']" for n in ["c_q", "c_proj"] + names]
    + [f"['blocks']['layers']['block']['mlp']['{n}']['kernel']" for n in ["c_fc", "c_proj"]]
  )
  assert muon == expected
