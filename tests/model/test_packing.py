"""Packed documents (config.model.separate_documents) and the activation sharding hooks.

With the flag on, a token's logits depend only on its own document: attention stays
within segment ids and rotary positions restart per document. With it off (the official
implementation's behaviour) the document packed before a token changes its logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.model.looped import LoopedTransformer
from flt_jax.model.loss import loss_fn
from tests.helpers.models import model_config, random_params

B, T, VOCAB = 2, 16, 70
# GQA (4 query heads over 2 kv heads) and a sliding window: layer 0 is 'S' with a window
# of seq_len // 4 = 4 tokens, shorter than the documents below; layer 1 is full.
PACKED = dict(
  n_layer=2,
  d_model=32,
  n_head=4,
  n_kv_head=2,
  window_pattern="SL",
  kv_lora_rank=0,
  vocab_size=VOCAB,
  seq_len=T,
  loops=3,
)


def make_cfg(**fields):
  return model_config(**{**PACKED, **fields})


@functools.cache
def noisy_params():
  """Every matrix non-zero: embedding N(0, 1), the rest N(0, 0.05)."""
  return random_params(make_cfg(), std=0.05, embedding_std=1.0)


@functools.cache
def _forward(variant, separate_documents):
  model = LoopedTransformer(make_cfg(variant=variant, separate_documents=separate_documents))
  return jax.jit(
    lambda p, tok, seg, pos: model.apply(
      {"params": p}, tok, 3, segment_ids_BxT=seg, positions_BxT=pos
    )
  )


def _rows():
  """Three rows that end in (a prefix of) the same document `doc`, after different documents.

  row 0: 5 tokens of document a, then doc[:11]; row 1: 8 other tokens, then doc[:8];
  row 2: doc[:16] alone. Returns tokens, segment ids, positions [3, T] and where doc starts.
  """
  rng = np.random.default_rng(5)
  doc = rng.integers(0, VOCAB, T)
  starts = (5, 8, 0)
  toks, seg, pos = [], [], []
  for row, start in enumerate(starts):
    before = rng.integers(0, VOCAB, start)
    toks.append(np.concatenate([before, doc[: T - start]]))
    seg.append(np.concatenate([np.full(start, 7 + row), np.full(T - start, 3)]))
    pos.append(np.concatenate([np.arange(start), np.arange(T - start)]))
  as_int = lambda rows: jnp.asarray(np.stack(rows), jnp.int32)
  return as_int(toks), as_int(seg), as_int(pos), starts


def _doc_logits(logits, starts, n=8):
  """The first n tokens of the shared document, from every row: [rows, n, V]."""
  return np.stack([np.asarray(logits[r, s : s + n]) for r, s in enumerate(starts)])


@pytest.mark.parametrize("variant", ["FLT", "LT"])
def test_logits_do_not_depend_on_the_document_packed_before(variant):
  params = noisy_params()
  toks, seg, pos, starts = _rows()
  doc = _doc_logits(_forward(variant, True)(params, toks, seg, pos), starts)
  _check_doc_logits(doc)
  # The document alone at the start of a row equals the unpacked model.
  unpacked = _forward(variant, False)(params, toks, seg, pos)
  np.testing.assert_allclose(_doc_logits(unpacked, starts)[2], doc[2], atol=2e-5, rtol=0)


def _check_doc_logits(doc):
  for row in (1, 2):
    np.testing.assert_allclose(doc[row], doc[0], atol=2e-5, rtol=0, err_msg=f"row {row}")
  # The document's tokens get different logits from each other (nothing degenerate).
  assert np.abs(doc[0] - doc[0][:1]).max() > 1e-3


@pytest.mark.parametrize("variant", ["FLT", "LT"])
def test_without_the_flag_the_previous_document_leaks_in(variant):
  """The official behaviour: shows that the test above can fail."""
  params = noisy_params()
  toks, seg, pos, starts = _rows()
  doc = _doc_logits(_forward(variant, False)(params, toks, seg, pos), starts)
  for row in (1, 2):
    assert np.abs(doc[row] - doc[0]).max() > 1e-3, row


def test_flag_without_segments_is_the_unpacked_model():
  params = noisy_params()
  toks, _, _, _ = _rows()
  on = LoopedTransformer(make_cfg(variant="FLT", separate_documents=True))
  got = jax.jit(lambda p, x: on.apply({"params": p}, x, 3))(params, toks)
  want = _forward("FLT", False)(params, toks, None, None)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_loss_fn_passes_segments_through():
  """The loss of the shared document's tokens is the same in rows 0 and 1 with the flag."""
  params = noisy_params()
  toks, seg, pos, starts = _rows()
  model = LoopedTransformer(make_cfg(variant="FLT", separate_documents=True))

  def doc_loss(p, row):
    targets = (
      jnp.full((1, T), -1, jnp.int32)
      .at[0, starts[row] : starts[row] + 7]
      .set(toks[row, starts[row] + 1 : starts[row] + 8])
    )
    sl = slice(row, row + 1)
    kw = dict(loops=3, segment_ids_BxT=seg[sl], positions_BxT=pos[sl])
    return loss_fn(p, model, toks[sl], targets, **kw)[0]

  fn = jax.jit(lambda p: (doc_loss(p, 0), doc_loss(p, 1)))
  a, b = fn(params)
  np.testing.assert_allclose(float(a), float(b), atol=1e-5, rtol=0)
  assert float(a) > 0


def _jaxpr_text(model, params):
  toks = jnp.zeros((B, T), jnp.int32)
  return str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, 2))(params, toks))


def test_activation_sharding_hooks_are_a_no_op_without_rules():
  params = noisy_params()
  model = LoopedTransformer(make_cfg(variant="FLT"))
  assert "sharding_constraint" not in _jaxpr_text(model, params)
  # With a rules table and a mesh the same hooks do constrain the activations.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rules = (("batch", "data"), ("length", None), ("act_embed", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert _jaxpr_text(model, params).count("sharding_constraint") >= 3
