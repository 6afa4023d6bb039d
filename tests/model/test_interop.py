"""Reference state-dict import/export (flt_jax.interop) against the official implementation's
state-dict layout, written out here by hand rather than taken from interop itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax import interop
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.models import model_config

B, T = 2, 12


def _cfg(**overrides):
  shape = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=100, seq_len=T)
  return model_config(
    **{"variant": "FLT", "loops": 2, "window_pattern": "L", "kv_lora_rank": 0, **shape, **overrides}
  )


def reference_state_dict(cfg, seed=0):
  """Random weights in the reference's names and torch [out, in] layouts (official code)."""
  rng = np.random.default_rng(seed)
  d, hd = cfg.d_model, cfg.d_model // cfg.n_head
  vpad = -(-cfg.vocab_size // 64) * 64
  q, kv, r = cfg.n_head * hd, cfg.n_kv_head * hd, cfg.kv_lora_rank
  w = lambda *shape: rng.normal(0, 0.05, shape).astype(np.float32)
  sd = {
    "transformer.wte.weight": rng.normal(0, 1, (vpad, d)).astype(np.float32),
    "lm_head.weight": w(vpad, d),
  }
  for l in range(cfg.n_layer):
    p = f"transformer.h.{l}."
    sd[p + "attn.c_q.weight"] = w(q, d)
    if r:
      sd[p + "attn.c_kv_down.weight"] = w(r, d)
      sd[p + "attn.c_k_up.weight"] = w(kv, r)
      sd[p + "attn.c_v_up.weight"] = w(kv, r)
    else:
      sd[p + "attn.c_k.weight"] = w(kv, d)
      sd[p + "attn.c_v.weight"] = w(kv, d)
    sd[p + "attn.c_proj.weight"] = w(d, q)
    sd[p + "mlp.c_fc.weight"] = w(4 * d, d)
    sd[p + "mlp.c_proj.weight"] = w(d, 4 * d)
  return sd


def _tokens():
  return jnp.asarray(np.random.default_rng(1).integers(0, 100, (B, T)), jnp.int32)


def _init_shapes(cfg):
  tree = jax.eval_shape(LoopedTransformer(cfg).init, jax.random.PRNGKey(0), _tokens())
  return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), nn.meta.unbox(tree["params"]))


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_params_npz_roundtrip_is_exact(tmp_path):
  cfg = _cfg()
  rng = np.random.default_rng(0)  # random values in the model's own tree
  params = jax.tree_util.tree_map(
    lambda s: jnp.asarray(rng.normal(0, 0.1, s[0]), s[1]),
    _init_shapes(cfg),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  path = tmp_path / "ref.npz"
  interop.save_reference_npz(str(path), params, cfg)
  with np.load(path) as f:
    saved = dict(f)
  assert set(saved) == set(reference_state_dict(cfg))
  # torch layout: Linear weights are [out, in], layer l is its own entry
  blk = params["blocks"]["layers"]["block"]
  np.testing.assert_array_equal(
    saved["transformer.h.1.attn.c_k.weight"], np.asarray(blk["attn"]["c_k"]["kernel"][1]).T
  )
  np.testing.assert_array_equal(saved["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)
  np.testing.assert_array_equal(
    saved["transformer.wte.weight"], np.asarray(params["wte"]["embedding"])
  )
  _assert_trees_equal(interop.load_reference_npz(str(path), cfg), params)


@pytest.mark.parametrize("mla", [False, True])
def test_reference_layout_loads_and_runs(mla):
  cfg = _cfg(kv_lora_rank=8) if mla else _cfg()
  sd = reference_state_dict(cfg)
  params = interop.from_reference(sd, cfg)
  # exactly the tree (names, shapes, float32) that the model itself initialises
  got = jax.tree_util.tree_map(lambda a: (np.shape(a), np.asarray(a).dtype), params)
  assert got == _init_shapes(cfg)
  blk = params["blocks"]["layers"]["block"]
  name = "c_kv_down" if mla else "c_v"
  np.testing.assert_array_equal(
    blk["attn"][name]["kernel"][0], sd[f"transformer.h.0.attn.{name}.weight"].T
  )
  np.testing.assert_array_equal(
    blk["mlp"]["c_fc"]["kernel"][1], sd["transformer.h.1.mlp.c_fc.weight"].T
  )
  logits = LoopedTransformer(cfg).apply({"params": params}, _tokens())
  assert logits.shape == (B, T, cfg.vocab_size)
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 1e-3  # the loaded weights are used
  # and back again, unchanged
  back = interop.to_reference(params, cfg)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _variants_of_bad(cfg):
  sd = reference_state_dict(cfg)
  bad = {}
  d = dict(sd)
  d["transformer.h.0.attn.c_q.weight"] = d["transformer.h.0.attn.c_q.weight"].T[:, :-1]
  bad["wrong shape"] = d
  d = dict(sd)
  d["transformer.h.1.mlp.c_fc.weight"] = d["transformer.h.1.mlp.c_fc.weight"].T  # [in, out]
  bad["transposed"] = d
  d = dict(sd)
  d["lm_head.weight"] = d["lm_head.weight"][: cfg.vocab_size]  # unpadded vocab
  bad["unpadded vocab"] = d
  d = dict(sd)
  del d["transformer.h.1.attn.c_v.weight"]
  bad["missing key"] = d
  d = dict(sd)
  del d["transformer.wte.weight"]
  bad["missing embedding"] = d
  d = dict(sd)
  d["transformer.h.2.attn.c_q.weight"] = d["transformer.h.1.attn.c_q.weight"]
  bad["extra layer"] = d
  bad["MLA dict for a standard config"] = reference_state_dict(_cfg(kv_lora_rank=8))
  return bad


@pytest.mark.parametrize("case", list(_variants_of_bad(_cfg())))
def test_bad_state_dict_raises_value_error(case):
  cfg = _cfg()
  with pytest.raises(ValueError):
    interop.from_reference(_variants_of_bad(cfg)[case], cfg)


def test_config_mismatch_raises_value_error():
  sd = reference_state_dict(_cfg())
  with pytest.raises(ValueError, match="n_layer|missing"):
    interop.from_reference(sd, _cfg(n_layer=3))
  with pytest.raises(ValueError, match="shape"):
    interop.from_reference(sd, _cfg(d_model=64))
  with pytest.raises(ValueError, match="shape"):
    interop.from_reference(sd, _cfg(n_kv_head=4))
