"""Our Pallas flash attention against the XLA reference, in Pallas' interpreter on CPU.

Both lowerings' kernels run here (the TPU-structured grid with scalar prefetch, and the
GPU-structured in-kernel loop); outputs and dq/dk/dv must match `xla_attention` to 2e-5
in float32 and 2e-2 in bfloat16. The window is a traced argument, so one compilation
serves every window. The full grid (T x Hkv x head dim x dtype x segment ids) is
`slow`; the default run covers a subset that still touches every feature once per lowering.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.kernels import block_math as bm
from flt_jax.kernels.flash import UnsupportedAttentionError, flash_attention
from flt_jax.model.attention import xla_attention

# Small blocks so that T=320 spans several blocks (and a padded last one).
BLOCKS = {"mosaic_tpu": 128, "triton": 64}
# Full context, a window narrower than a block, one spanning blocks at no block boundary.
WINDOWS = (-1, 48, 200)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
H, B = 4, 2


def _segments(T: int, seed: int):
  """Packed-document ids 1, 1, ..., 2, 2, ... with random boundaries per row."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(T), side="right") + 1)
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(T: int, S: int, Hkv: int, D: int, dtype, seed: int = 0):
  """q, k, v RMS-normalised like the model's, and a random output cotangent."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  norm = lambda x: x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
  q = norm(jax.random.normal(keys[0], (B, T, H, D)))
  k = norm(jax.random.normal(keys[1], (B, S, Hkv, D)))
  v = jax.random.normal(keys[2], (B, S, Hkv, D))
  do = jax.random.normal(keys[3], (B, T, H, D))
  return tuple(x.astype(dtype) for x in (q, k, v, do))


def _value_and_grads(attention, q, k, v, do):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(do))


@functools.cache
def _compiled(lowering, T, Hkv, D, dtype, with_segments):
  """Compiled fn(q, k, v, do, window, seg) -> ((o, dq, dk, dv) ours, (...) XLA's)."""

  def fn(q, k, v, do, window, seg):
    segs = dict(q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg) if with_segments else {}
    ours = functools.partial(
      flash_attention,
      window_left=window,
      block_q=BLOCKS[lowering],
      block_kv=BLOCKS[lowering],
      lowering=lowering,
      interpret=True,
      **segs,
    )
    ref = functools.partial(xla_attention, window_left=window, **segs)
    return _value_and_grads(ours, q, k, v, do), _value_and_grads(ref, q, k, v, do)

  args = (*_inputs(T, T, Hkv, D, dtype), jnp.int32(-1), _segments(T, 0))
  return jax.jit(fn).lower(*args).compile()


def _check(lowering, T, Hkv, D, dtype, with_segments):
  fn = _compiled(lowering, T, Hkv, D, dtype, with_segments)
  q, k, v, do = _inputs(T, T, Hkv, D, dtype, seed=T + Hkv + D)
  seg = _segments(T, seed=T)
  tol = TOL[dtype]
  for window in WINDOWS:
    ours, ref = fn(q, k, v, do, jnp.int32(window), seg)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
      np.testing.assert_allclose(
        np.asarray(a, np.float32),
        np.asarray(b, np.float32),
        atol=tol,
        rtol=tol,
        err_msg=f"{name} differs: {lowering} T={T} Hkv={Hkv} D={D} window={window} "
        f"segments={with_segments} {jnp.dtype(dtype).name}",
      )


GRID = list(
  itertools.product(
    ("mosaic_tpu", "triton"),
    (128, 256, 320),
    (4, 2, 1),
    (64, 128),
    (jnp.float32, jnp.bfloat16),
    (False, True),
  )
)
# One case per lowering and feature: padded T (320) with GQA 2:1 and segment ids in f32,
# MQA (Hkv=1) at head dim 128 in bf16, and MHA at T=128 (a single block).
DEFAULT = [
  (lowering, *case)
  for lowering in ("mosaic_tpu", "triton")
  for case in (
    (320, 2, 64, jnp.float32, True),
    (256, 1, 128, jnp.bfloat16, False),
    (128, 4, 64, jnp.float32, False),
  )
]


def _id(case):
  lowering, T, Hkv, D, dtype, segs = case
  return f"{lowering}-T{T}-Hkv{Hkv}-D{D}-{jnp.dtype(dtype).name}{'-seg' if segs else ''}"


@pytest.mark.parametrize("case", DEFAULT, ids=_id)
def test_matches_xla(case):
  _check(*case)


def test_tpu_kernel_takes_a_head_dim_off_the_lane_width():
  """Mosaic blocks span the whole head dim, so 96 works (it compiles for TPU, too)."""
  _check("mosaic_tpu", 128, 2, 96, jnp.float32, False)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GRID if c not in DEFAULT], ids=_id)
def test_matches_xla_full_grid(case):
  _check(*case)


# --- Blocks that the mask hides entirely are skipped, not masked ------------------------


@functools.cache
def _compiled_small(lowering, T, S, Hkv, window_static=None):
  """fn(q, k, v, do, window, q_offset) -> (o, dq, dk, dv) of our kernel, float32, D=64."""

  def fn(q, k, v, do, window, q_offset):
    ours = functools.partial(
      flash_attention,
      window_left=window if window_static is None else window_static,
      q_offset=q_offset,
      block_q=BLOCKS[lowering],
      block_kv=BLOCKS[lowering],
      lowering=lowering,
      interpret=True,
    )
    return _value_and_grads(ours, q, k, v, do)

  args = (*_inputs(T, S, Hkv, 64, jnp.float32), jnp.int32(-1), jnp.int32(0))
  return jax.jit(fn).lower(*args).compile()


def _reference(q, k, v, do, window, q_offset=0):
  ref = functools.partial(xla_attention, window_left=window, q_offset=q_offset)
  return _value_and_grads(ref, q, k, v, do)


@pytest.mark.parametrize("lowering", ["mosaic_tpu", "triton"])
def test_hidden_blocks_are_skipped_not_masked(lowering):
  """NaN planted where no query of a block looks must not reach that block's results:
  a masked-but-computed block would turn it into NaN through 0 * NaN."""
  bl = BLOCKS[lowering]
  T = 3 * bl
  fn = _compiled_small(lowering, T, T, 1)
  q, k, v, do = _inputs(T, T, 1, 64, jnp.float32, seed=7)
  nan = jnp.float32(jnp.nan)

  def plant(x, rows):
    return x.at[:, rows].set(nan), x.at[:, rows].set(0.0)

  # Window 48 < bl: query block 2 never reaches key block 0 (forward and dq skip it).
  k_nan, k_zero = plant(k, slice(0, bl))
  v_nan, v_zero = plant(v, slice(0, bl))
  ours = fn(q, k_nan, v_nan, do, jnp.int32(48), jnp.int32(0))
  ref = _reference(q, k_zero, v_zero, do, 48)
  for name, i in (("out", 0), ("dq", 1)):
    np.testing.assert_allclose(ours[i][:, 2 * bl :], ref[i][:, 2 * bl :], atol=2e-5, err_msg=name)
  # Full context: query block 0 never reaches key block 2 (above the diagonal).
  k_nan, k_zero = plant(k, slice(2 * bl, T))
  v_nan, v_zero = plant(v, slice(2 * bl, T))
  ours = fn(q, k_nan, v_nan, do, jnp.int32(-1), jnp.int32(0))
  ref = _reference(q, k_zero, v_zero, do, -1)
  for name, i in (("out", 0), ("dq", 1)):
    np.testing.assert_allclose(ours[i][:, :bl], ref[i][:, :bl], atol=2e-5, err_msg=name)
  # dK/dV: key block 0 is never visited by query block 2 (window), key blocks 1-2 never
  # by query block 0 (causal); NaN queries and output gradients there must not leak in.
  for window, rows, keys in (
    (48, slice(2 * bl, T), slice(0, bl)),
    (-1, slice(0, bl), slice(bl, T)),
  ):
    q_nan, q_zero = plant(q, rows)
    do_nan, do_zero = plant(do, rows)
    ours = fn(q_nan, k, v, do_nan, jnp.int32(window), jnp.int32(0))
    ref = _reference(q_zero, k, v, do_zero, window)
    for name, i in (("dk", 2), ("dv", 3)):
      np.testing.assert_allclose(ours[i][:, keys], ref[i][:, keys], atol=2e-5, err_msg=name)


@pytest.mark.parametrize("lowering", ["mosaic_tpu", "triton"])
def test_query_offset_matches_xla(lowering):
  """Queries that start after the keys do (a chunk of a longer sequence), GQA 4:1."""
  T, S, offset = 128, 320, 192
  fn = _compiled_small(lowering, T, S, 1)
  q, k, v, do = _inputs(T, S, 1, 64, jnp.float32, seed=3)
  for window in (-1, 100):
    ours = fn(q, k, v, do, jnp.int32(window), jnp.int32(offset))
    ref = _reference(q, k, v, do, window, offset)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"{name} window={window}")


def _grid_sizes(jaxpr):
  """Grids of every pallas_call in a jaxpr (nested jaxprs included)."""
  grids = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      grids.append(tuple(eqn.params["grid_mapping"].grid))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        grids += _grid_sizes(inner)
  return grids


def test_static_window_shrinks_the_tpu_grid_and_matches_xla():
  """A window known at trace time bounds the kv steps per query block (and query steps per
  kv block) in the grid itself, instead of walking every block and skipping most."""
  T, window = 512, 100  # 4 blocks of 128; a query block needs at most 3 kv blocks
  q, k, v, do = _inputs(T, T, 2, 64, jnp.float32, seed=5)
  attention = functools.partial(
    flash_attention, block_q=128, block_kv=128, lowering="mosaic_tpu", interpret=True
  )
  jaxpr = jax.make_jaxpr(
    lambda q, k, v, do: _value_and_grads(
      functools.partial(attention, window_left=window), q, k, v, do
    )
  )(q, k, v, do)
  grids = _grid_sizes(jaxpr.jaxpr)
  assert len(grids) == 3 and all(grid[-1] == 3 for grid in grids), grids
  traced = jax.make_jaxpr(
    lambda q, k, v, do, w: _value_and_grads(
      functools.partial(attention, window_left=w), q, k, v, do
    )
  )(q, k, v, do, jnp.int32(window))
  assert all(grid[-1] == 4 for grid in _grid_sizes(traced.jaxpr))
  compiled = (
    jax.jit(
      lambda q, k, v, do: _value_and_grads(
        functools.partial(attention, window_left=window), q, k, v, do
      )
    )
    .lower(q, k, v, do)
    .compile()
  )
  ours = compiled(q, k, v, do)
  ref = _reference(q, k, v, do, window)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)


# --- Block arithmetic against brute force ------------------------------------------------


def _live_and_full(T, S, bq, bk, window, q_offset):
  """Brute force: [nq, nk] 'some pair visible' and 'every pair visible' per block pair."""
  Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
  q_pos = q_offset + np.arange(Tp)[:, None]
  k_pos = np.arange(Sp)[None, :]
  w = window if window > 0 else bm.FULL_WINDOW
  vis = (k_pos <= q_pos) & (q_pos - k_pos < w) & (k_pos < S)
  blocks = vis.reshape(Tp // bq, bq, Sp // bk, bk)
  return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


CASES = [
  # T, S, bq, bk, window, q_offset
  (320, 320, 128, 128, -1, 0),
  (320, 320, 128, 128, 48, 0),
  (320, 320, 64, 128, 200, 0),
  (384, 384, 128, 64, 129, 0),
  (128, 320, 128, 64, -1, 192),
  (128, 320, 64, 64, 100, 192),
  (64, 512, 64, 128, 30, 0),  # keys past every query
  (256, 256, 128, 128, 1, 0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_ranges_match_brute_force(case):
  T, S, bq, bk, window, q_offset = case
  live, full = _live_and_full(*case)
  nq, nk = live.shape
  kw = dict(block_q=bq, block_kv=bk, kv_len=S)
  w, off = bm.effective_window(window), jnp.int32(q_offset)
  first, last = bm.kv_block_range(jnp.arange(nq), w, off, **kw)
  full_first, full_last = bm.unmasked_kv_blocks(jnp.arange(nq), w, off, **kw)
  blocks = np.arange(nk)[None, :]
  in_range = (blocks >= np.asarray(first)[:, None]) & (blocks <= np.asarray(last)[:, None])
  np.testing.assert_array_equal(in_range, live)
  unmasked = (blocks >= np.asarray(full_first)[:, None]) & (
    blocks <= np.asarray(full_last)[:, None]
  )
  np.testing.assert_array_equal(unmasked & live, full & live)
  steps = bm.max_kv_steps(window, block_q=bq, block_kv=bk, num_kv_blocks=nk)
  assert steps >= live.sum(axis=1).max()

  first, last = bm.q_block_range(jnp.arange(nk), w, off, num_q_blocks=nq, **kw)
  full_first, full_last = bm.unmasked_q_blocks(jnp.arange(nk), w, off, **kw)
  blocks = np.arange(nq)[None, :]
  in_range = (blocks >= np.asarray(first)[:, None]) & (blocks <= np.asarray(last)[:, None])
  np.testing.assert_array_equal(in_range, live.T)
  unmasked = (blocks >= np.asarray(full_first)[:, None]) & (
    blocks <= np.asarray(full_last)[:, None]
  )
  np.testing.assert_array_equal(unmasked & live.T, full.T & live.T)
  steps = bm.max_q_steps(window, block_q=bq, block_kv=bk, num_q_blocks=nq)
  assert steps >= live.sum(axis=0).max()


# --- What the kernel cannot run is a clear error -----------------------------------------


def _call(D=64, lowering="mosaic_tpu", dtype=jnp.float32, **kw):
  q, k, v, _ = _inputs(128, 128, 2, D, dtype)
  return flash_attention(q, k, v, window_left=-1, lowering=lowering, interpret=True, **kw)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(D=96, lowering="triton"), "power-of-two head_dim.*head_dim=96"),
    (dict(block_q=100), "block_q=100 does not tile on TPU"),
    (dict(block_kv=48, lowering="triton"), "block_kv=48 does not tile with Triton"),
    (dict(lowering="cuda"), "lowering='cuda'"),
    (dict(dtype=jnp.float16), "float32 or bfloat16"),
    (dict(q_segment_ids_BxT=jnp.zeros((B, 128), jnp.int32)), "give both"),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)
def test_unsupported_input_is_a_clear_error(kw, match):
  with pytest.raises(UnsupportedAttentionError, match=match):
    _call(**kw)
