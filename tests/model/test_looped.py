"""The looped model against an independent, plainly unrolled float64 reference, and
the properties the method (arXiv:2605.18797) and the scanned implementation promise:
K=1 is a plain transformer for every variant, variants differ for K >= 2, causality,
K-independent parameters, remat-invariant gradients, loss placement (END/STEP/FEW), K
changeable at inference, and a bfloat16 compute path.

Compilation dominates the runtime on CPU, so every compiled function is built
once per (config, shapes) and shared between tests through caches.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals
from jax.extend import core as jax_core

from flt_jax.model.config import CHECKPOINT_NAMES, ModelConfig, remat_policy
from flt_jax.model.layers import Block, rope_tables
from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import loss_fn
from tests.helpers import reference as jax_reference
from tests.helpers.models import model_config, random_params

VARIANTS = ("FLT", "FLT_res", "LT", "LT_i", "LT_ia")
B, T = 2, 16
VOCAB = 70  # padded to 128 internally, so the slice back to the true vocab is exercised
BASE = dict(
  n_layer=2,
  d_model=32,
  n_head=2,
  n_kv_head=2,
  vocab_size=VOCAB,
  seq_len=T,
  loops=3,
  window_pattern="L",
  kv_lora_rank=0,
)
ATTENTION = {
  "full": dict(),
  "gqa": dict(n_head=4, n_kv_head=2),
  # layer 0 is 'S' (window seq_len//4 = 4 < T), layer 1 is always full
  "swa": dict(window_pattern="SL", n_head=4, n_kv_head=1),
  "mla": dict(kv_lora_rank=16, n_head=4, n_kv_head=2),
}


def make_cfg(**overrides) -> ModelConfig:
  return model_config(**{**BASE, **overrides})


def _key(d):
  return tuple(sorted(d.items()))


@functools.cache
def forward(cfg_key, loops=(1, 3)):
  """Compiled fn(params, tokens) -> tuple of logits, one per loop count."""
  model = LoopedTransformer(make_cfg(**dict(cfg_key)))
  return jax.jit(lambda p, tok: tuple(model.apply({"params": p}, tok, k) for k in loops))


@functools.cache
def noisy_params(cfg_key, seed=0, block_std=0.05, head_std=0.05):
  """Params with the model's tree and shapes, every matrix non-zero: embedding N(0, 1),
  lm_head N(0, head_std), block matrices N(0, block_std) (so that zero-initialised
  projections cannot hide bugs)."""
  cfg = make_cfg(**dict(cfg_key))
  return random_params(cfg, seed, block_std, embedding_std=1.0, head_std=head_std)


def tokens(seed=0, batch=B, length=T):
  return jnp.asarray(
    np.random.default_rng(100 + seed).integers(0, VOCAB, (batch, length)), jnp.int32
  )


# ---------------------------------------------------------------------------
# Independent reference: the method and the official implementation's architecture
# written out with plain loops in float64 numpy.

_EPS32 = float(np.finfo(np.float32).eps)


def _rms(x):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + _EPS32)


def _rope(x, base=10000.0):  # x [B, T, H, hd]: rotate the two halves as pairs
  t, hd = x.shape[1], x.shape[-1]
  freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  ang = np.arange(t, dtype=np.float64)[:, None] * freq[None, :]
  cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
  a, b = x[..., : hd // 2], x[..., hd // 2 :]
  return np.concatenate([a * cos + b * sin, -a * sin + b * cos], axis=-1)


def _attention(w, q_in, kv_in, cfg, window):
  bsz, t, _ = q_in.shape
  h, hkv = cfg.n_head, cfg.n_kv_head
  hd = cfg.d_model // h
  q = (q_in @ w["c_q"]).reshape(bsz, t, h, hd)
  if cfg.kv_lora_rank:
    latent = _rms(kv_in @ w["c_kv_down"])
    k, v = latent @ w["c_k_up"], latent @ w["c_v_up"]
  else:
    k, v = kv_in @ w["c_k"], kv_in @ w["c_v"]
  k, v = k.reshape(bsz, t, hkv, hd), v.reshape(bsz, t, hkv, hd)
  q, k = _rms(_rope(q)), _rms(_rope(k))
  out = np.zeros((bsz, t, h, hd))
  for head in range(h):
    kv_head = head // (h // hkv)  # query heads are grouped consecutively per kv head
    for i in range(t):
      js = [j for j in range(i + 1) if window is None or i - j < window]
      s = np.einsum("bd,bjd->bj", q[:, i, head], k[:, js, kv_head]) / np.sqrt(hd)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, i, head] = np.einsum("bj,bjd->bd", p, v[:, js, kv_head])
  return out.reshape(bsz, t, h * hd) @ w["c_proj"]


def reference_logits(params, cfg, toks, loops):
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  blk = p["blocks"]["layers"]["block"]
  layer_w = lambda mod, l: {n: v["kernel"][l] for n, v in blk[mod].items()}
  windows = jax_reference.windows(cfg)
  x0 = p["wte"]["embedding"][np.asarray(toks)]
  h = None
  for i in range(loops):
    if i == 0:
      x = _rms(x0)
    elif cfg.variant == "LT":
      x = h
    elif cfg.variant == "LT_i":
      x = _rms(x0 + h)
    else:
      x = _rms(x0)
    for l in range(cfg.n_layer):
      if cfg.variant == "FLT_res" and h is not None:
        x = _rms(x + h)
      xn = _rms(x)
      inject = h is not None and (cfg.variant == "FLT" or (cfg.variant == "LT_ia" and l == 0))
      x = x + _attention(layer_w("attn", l), _rms(h) if inject else xn, xn, cfg, windows[l])
      m = _rms(x) @ layer_w("mlp", l)["c_fc"]
      x = x + (np.maximum(m, 0.0) ** 2) @ layer_w("mlp", l)["c_proj"]
    h = _rms(x)
  z = (h @ p["lm_head"]["kernel"])[..., : cfg.vocab_size]
  return cfg.softcap * np.tanh(z / cfg.softcap)


def _ce(logits, targets):
  """Mean next-token cross-entropy in float64, ignoring targets == -1."""
  z = np.asarray(logits, np.float64)
  lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
  t = np.asarray(targets)
  valid = t != -1
  picked = np.take_along_axis(z, np.where(valid, t, 0)[..., None], -1)[..., 0]
  return float(np.sum((lse - picked) * valid) / valid.sum())


def _cfg_key(variant, attention):
  return _key({"variant": variant, **ATTENTION[attention]})


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("variant", VARIANTS)
def test_scan_model_matches_unrolled_reference(variant, attention):
  key = _cfg_key(variant, attention)
  cfg, params, toks = make_cfg(**dict(key)), noisy_params(_key(ATTENTION[attention])), tokens()
  for loops, got in zip((1, 3), forward(key)(params, toks)):
    want = reference_logits(params, cfg, toks, loops)
    assert got.shape == (B, T, VOCAB) and got.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(got), want, atol=1e-5, rtol=0, err_msg=f"{variant} {attention} K={loops}"
    )


def test_reference_window_matters_at_this_seq_len():
  """Guards the test above: in the SWA case the window really cuts context at T=16."""
  params, toks = noisy_params(_key(ATTENTION["swa"])), tokens()
  with_window = reference_logits(params, make_cfg(variant="FLT", **ATTENTION["swa"]), toks, 3)
  no_window = reference_logits(
    params, make_cfg(variant="FLT", **{**ATTENTION["swa"], "window_pattern": "L"}), toks, 3
  )
  w = BASE["seq_len"] // 4
  np.testing.assert_allclose(with_window[:, :w], no_window[:, :w], atol=1e-12)
  assert np.abs(with_window[:, w:] - no_window[:, w:]).max() > 1e-3


@pytest.mark.parametrize("attention", ["full", "mla"])
def test_k1_is_the_same_plain_transformer_for_every_variant(attention):
  params, toks = noisy_params(_key(ATTENTION[attention])), tokens()
  k1 = [np.asarray(forward(_cfg_key(v, attention))(params, toks)[0]) for v in VARIANTS]
  for v, out in zip(VARIANTS[1:], k1[1:]):
    np.testing.assert_allclose(out, k1[0], atol=1e-6, rtol=0, err_msg=v)


@pytest.mark.parametrize("attention", ["full", "swa"])
def test_variants_differ_pairwise_for_k3(attention):
  params, toks = noisy_params(_key(ATTENTION[attention])), tokens()
  k3 = {v: np.asarray(forward(_cfg_key(v, attention))(params, toks)[1]) for v in VARIANTS}
  for a, b in itertools.combinations(VARIANTS, 2):
    assert np.abs(k3[a] - k3[b]).max() > 1e-3, (a, b)  # float32 noise is ~1e-6


@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_changing_token_t_leaves_earlier_positions_unchanged(variant, attention):
  params, toks = noisy_params(_key(ATTENTION[attention])), tokens(seed=3)
  fn = forward(_cfg_key(variant, attention))
  for t in (1, 9, T - 1):
    changed = toks.at[:, t].set((toks[:, t] + 17) % VOCAB)
    for loops, before, after in zip((1, 3), fn(params, toks), fn(params, changed)):
      before, after = np.asarray(before), np.asarray(after)
      np.testing.assert_allclose(
        after[:, :t],
        before[:, :t],
        atol=1e-6,
        rtol=0,
        err_msg=f"{variant} {attention} K={loops} t={t}",
      )
      assert np.abs(after[:, t] - before[:, t]).max() > 1e-4  # the change is visible at t


def test_parameter_count_independent_of_loops():
  toks = jnp.zeros((1, 8), jnp.int32)

  def shapes(loops):
    cfg = make_cfg(variant="FLT", loops=loops)
    tree = jax.eval_shape(LoopedTransformer(cfg).init, jax.random.PRNGKey(0), toks)
    return nn.meta.unbox(tree["params"])

  s1, s12 = shapes(1), shapes(12)
  assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s12)
  assert jax.tree_util.tree_map(lambda a: a.shape, s1) == jax.tree_util.tree_map(
    lambda a: a.shape, s12
  )
  count = sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(s12))
  d, vpad, layers = BASE["d_model"], 128, BASE["n_layer"]
  assert count == 2 * vpad * d + layers * (4 * d * d + 8 * d * d)  # wte + lm_head + blocks


@functools.cache
def _value_and_grad(cfg_key, loops):
  model = LoopedTransformer(make_cfg(**dict(cfg_key)))
  fn = lambda p, x, y: loss_fn(p, model, x, y, loops=loops)[0]
  return jax.jit(jax.value_and_grad(fn))


def test_loss_and_grads_finite_at_k12():
  key = _key({"variant": "FLT", "loops": 12, **ATTENTION["gqa"]})
  params, toks = noisy_params(_key(ATTENTION["gqa"])), tokens()
  loss, grads = _value_and_grad(key, 12)(params, toks, jnp.roll(toks, -1, 1))
  assert np.isfinite(float(loss)) and float(loss) > 0
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)  # every weight gets gradient


@functools.cache
def _reference_value_and_grad(cfg_key, loops):
  cfg = make_cfg(**dict(cfg_key))

  def loss(p, x, y):
    logits = jax_reference.reference_logits(p, cfg, x, loops)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0])

  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize(
  "variant,attention", [("FLT", "swa"), ("LT", "swa"), ("FLT_res", "gqa"), ("LT_i", "mla")]
)
def test_gradients_match_plain_autodiff_reference(variant, attention):
  """The model's custom VJPs (RMSNorm, softmax, recomputed relu²) against jax.grad of a
  plain jax.numpy model; the reference itself is checked against the float64 one."""
  key = _cfg_key(variant, attention)
  cfg, params, toks = make_cfg(**dict(key)), noisy_params(_key(ATTENTION[attention])), tokens()
  targets = jnp.roll(toks, -1, 1)
  np.testing.assert_allclose(
    np.asarray(
      jax.jit(jax_reference.reference_logits, static_argnums=(1, 3))(params, cfg, toks, 3)
    ),
    reference_logits(params, cfg, toks, 3),
    atol=1e-5,
    rtol=0,
  )
  want_loss, want = _reference_value_and_grad(key, 3)(params, toks, targets)
  got_loss, got = _value_and_grad(key, 3)(params, toks, targets)
  np.testing.assert_allclose(float(got_loss), float(want_loss), atol=1e-5, rtol=0)
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)
  ):
    scale = float(jnp.abs(w).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(path)
    )


REMAT_CASE = {"variant": "FLT", "loss_type": "STEP", **ATTENTION["swa"]}


@pytest.mark.parametrize(
  "remat,policy",
  [
    ("loop", "nothing"),
    ("block", "nothing"),
    ("block", "dots_no_batch"),
    ("block", "attn_out,mlp_in"),
    ("loop", "qkv,mlp_hidden"),
  ],
)
def test_remat_does_not_change_loss_or_gradients(remat, policy):
  params, toks = noisy_params(_key(ATTENTION["swa"])), tokens()
  targets = jnp.roll(toks, -1, 1)
  loss0, g0 = _value_and_grad(_key({**REMAT_CASE, "remat": "none"}), 3)(params, toks, targets)
  case = {**REMAT_CASE, "remat": remat, "remat_policy": policy}
  loss1, g1 = _value_and_grad(_key(case), 3)(params, toks, targets)
  np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-5, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize("remat", ["none", "block"])
def test_unrolled_layers_match_the_layer_scan(remat):
  """unroll_layers changes only how the layer scan is compiled: same params, loss, grads."""
  scanned = {**REMAT_CASE, "remat": remat}
  unrolled = {**scanned, "unroll_layers": True}
  params = noisy_params(_key(scanned))
  params_shape = lambda key: jax.tree.map(jnp.shape, noisy_params(_key(key)))
  assert params_shape(unrolled) == params_shape(scanned)
  toks = tokens()

  def layer_scan_unroll(key):  # the `unroll` of the scans over the n_layer=2 layers
    model = LoopedTransformer(make_cfg(**key))
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, toks, 3))(params).jaxpr
    found, todo = set(), [jaxpr]
    while todo:
      for eqn in todo.pop().eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == 2:
          found.add(eqn.params["unroll"])
        todo += [v.jaxpr for v in eqn.params.values() if isinstance(v, jax_core.ClosedJaxpr)]
    return found

  assert layer_scan_unroll(scanned) == {1} and layer_scan_unroll(unrolled) == {2}
  targets = jnp.roll(toks, -1, 1)
  loss0, g0 = _value_and_grad(_key(scanned), 3)(params, toks, targets)
  loss1, g1 = _value_and_grad(_key(unrolled), 3)(params, toks, targets)
  np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-5, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
    assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize("policy", CHECKPOINT_NAMES + ("attn_out,mlp_in",))
def test_named_remat_policy_saves_exactly_the_named_tensors(policy):
  """Each CHECKPOINT_NAMES tag exists in the block, so a policy naming it saves it."""
  cfg = make_cfg(variant="FLT", **ATTENTION["gqa"])
  block = Block(cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, cfg.d_model)), jnp.float32)
  cos, sin = (jnp.asarray(a)[None] for a in rope_tables(cfg.head_dim, T, 1e4, False))
  args = (x, x, x, jnp.array(True), jnp.array(False), cos, sin, jnp.int32(-1))
  params = block.init(jax.random.PRNGKey(0), *args)

  def loss(p, x):
    run = lambda p, x: block.apply(p, x, *args[1:])
    return jnp.sum(jax.checkpoint(run, policy=remat_policy(policy))(p, x))

  saved = [src for _, src in saved_residuals(loss, params, x)]
  named = sorted({n for n in CHECKPOINT_NAMES for src in saved if f"named '{n}'" in src})
  assert named == sorted(policy.split(",")), saved


def test_remat_loop_forward_and_end_loss_run():
  """remat='loop' must also work for plain inference and the END loss path."""
  key = _key({"variant": "LT_i", "remat": "loop", **ATTENTION["full"]})
  params, toks = noisy_params(_key(ATTENTION["full"])), tokens()
  got = forward(key)(params, toks)
  want = forward(_key({"variant": "LT_i", **ATTENTION["full"]}))(params, toks)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@functools.cache
def _loss_and_per_loop(variant, loss_type, loops):
  """Compiled fn -> (loss_fn loss, diagnostics loop_loss [K], per-loop logits [K, B, T, V])."""
  model = LoopedTransformer(make_cfg(variant=variant, loss_type=loss_type))

  def fn(p, x, y):
    loss, aux = loss_fn(p, model, x, y, loops=loops, diagnostics=True)
    loss_nodiag, _ = loss_fn(p, model, x, y, loops=loops)
    h_all, _ = model.apply({"params": p}, x, loops, True, method=model.hidden_states)
    logits = jnp.stack(
      [model.apply({"params": p}, h_all[k], method=model.logits) for k in range(loops)]
    )
    return loss, loss_nodiag, aux["loop_loss"], aux["residual_norm"], logits

  return jax.jit(fn)


@pytest.mark.parametrize(
  "loss_type,loops,picked",
  [
    ("END", 3, [2]),
    ("STEP", 3, [0, 1, 2]),
    ("FEW", 3, [2]),
    ("FEW", 6, [4, 5]),
  ],
)
def test_loss_placement(loss_type, loops, picked):
  # larger weights than elsewhere so that the per-loop losses clearly differ
  params = noisy_params(_key(ATTENTION["full"]), block_std=0.2, head_std=1.0)
  toks = tokens()
  targets = np.asarray(jnp.roll(toks, -1, 1)).copy()
  targets[:, -1] = -1  # ignored label
  targets[0, 3] = -1
  loss, loss_nodiag, loop_loss, residual_norm, logits = _loss_and_per_loop("FLT", loss_type, loops)(
    params, toks, jnp.asarray(targets)
  )
  own = [_ce(logits[k], targets) for k in range(loops)]
  assert loop_loss.shape == (loops,) and residual_norm.shape == (loops,)
  np.testing.assert_allclose(np.asarray(loop_loss), own, atol=1e-5, rtol=0)
  want = np.mean([own[k] for k in picked])
  np.testing.assert_allclose(float(loss), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(loss_nodiag), want, atol=1e-5, rtol=0)
  # the per-loop losses differ, so picking the wrong loops would be caught
  assert np.ptp(own) > 1e-2
  if len(picked) < loops:
    assert abs(np.mean(own) - want) > 1e-3
  if picked != [loops - 1]:
    assert abs(own[-1] - want) > 1e-3
  if loops == 3:  # the last loop's logits are what the model returns at K=3
    k3 = forward(_key({"variant": "FLT", **ATTENTION["full"]}))(params, toks)[1]
    np.testing.assert_allclose(np.asarray(logits[-1]), np.asarray(k3), atol=1e-6, rtol=0)


def test_few_uses_last_third():
  assert make_cfg(loss_type="FEW").loss_loops(3) == (2,)
  assert make_cfg(loss_type="FEW").loss_loops(6) == (4, 5)
  assert make_cfg(loss_type="FEW").loss_loops(12) == tuple(range(8, 12))
  assert make_cfg(loss_type="STEP").loss_loops(4) == (0, 1, 2, 3)
  assert make_cfg(loss_type="END").loss_loops(4) == (3,)


def test_params_initialised_at_one_k_run_at_another():
  cfg2 = make_cfg(variant="FLT", loops=2, **ATTENTION["gqa"])
  toks = tokens()
  variables = jax.jit(LoopedTransformer(cfg2).init)(jax.random.PRNGKey(1), toks)
  params = nn.meta.unbox(variables["params"])
  # the reference init zeroes both c_proj; perturb so that K matters
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map(
    lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), jnp.float32), params
  )
  key2 = _key({"variant": "FLT", "loops": 2, **ATTENTION["gqa"]})
  at2, at5 = (np.asarray(o) for o in forward(key2, (2, 5))(params, toks))
  np.testing.assert_allclose(at5, reference_logits(params, cfg2, toks, 5), atol=1e-5, rtol=0)
  assert np.abs(at5 - at2).max() > 1e-3
  # the same params under a model configured with loops=5 (used by default) agree
  model5 = LoopedTransformer(make_cfg(variant="FLT", loops=5, **ATTENTION["gqa"]))
  default5 = jax.jit(lambda p, x: model5.apply({"params": p}, x))(params, toks)
  np.testing.assert_allclose(np.asarray(default5), at5, atol=1e-6, rtol=0)


def test_bfloat16_compute_close_to_float32():
  key32 = _key({"variant": "FLT", **ATTENTION["gqa"]})
  key16 = _key({"variant": "FLT", "dtype": "bfloat16", **ATTENTION["gqa"]})
  shapes = jax.eval_shape(
    LoopedTransformer(make_cfg(**dict(key16))).init, jax.random.PRNGKey(0), tokens()
  )
  assert all(
    a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(nn.meta.unbox(shapes["params"]))
  )
  params, toks = noisy_params(_key(ATTENTION["gqa"])), tokens()
  for loops, a, b in zip((1, 3), forward(key32)(params, toks), forward(key16)(params, toks)):
    assert b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b)))
    diff = np.abs(np.asarray(a) - np.asarray(b))
    scale = np.abs(np.asarray(a)).max()
    assert diff.max() < 0.05 * scale + 0.02, (loops, diff.max(), scale)
    assert diff.max() > 0  # bfloat16 was actually used
