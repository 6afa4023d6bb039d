"""Loop-sweep outputs: the CSVs round-trip their numbers exactly, the PNGs are real
images with a panel per metric, and the h-change signal is 0 at a fixed point and equals
a direct numpy computation from separately run loop counts."""

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpl_image

from flt_jax.eval import sweep_report
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.models import model_config, random_params

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SWEEP = {
  1: {"loss": 3.25, "bpb": 4.6889, "tokens": 2048.0, "h_change": math.nan},
  4: {"loss": 2.125, "bpb": 3.0657, "tokens": 2048.0, "h_change": 0.1234567890123},
  12: {"loss": 1.75, "bpb": 2.5247, "tokens": 2048.0, "h_change": 0.01},
  # answer accuracy only at some K' (an empty cell elsewhere)
  24: {"loss": 1.8125, "bpb": 2.6149, "tokens": 2048.0, "h_change": 0.001, "answer_accuracy": 0.5},
}


def _same(a, b):
  return (math.isnan(a) and math.isnan(b)) or a == b


def _png_shape(path):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
  pixels = mpl_image.imread(io.BytesIO(data), format="png")
  assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
  assert pixels.std() > 0  # something was drawn
  return pixels.shape


def test_sweep_csv_round_trips_the_numbers(tmp_path):
  paths = sweep_report.write_sweep_report(SWEEP, 12, str(tmp_path / "eval"))
  assert paths["csv"].name == "loop_sweep.csv" and paths["png"].name == "loop_sweep.png"
  header = paths["csv"].read_text().splitlines()[0].split(",")
  assert header == [
    "loops",
    "trained_loops",
    "loss",
    "bpb",
    "answer_accuracy",
    "h_change",
    "tokens",
  ]
  results, trained = sweep_report.read_sweep_csv(paths["csv"])
  assert trained == 12
  assert list(results) == [1, 4, 12, 24]
  for loops, row in SWEEP.items():
    assert set(results[loops]) == set(row)
    assert all(_same(results[loops][k], v) for k, v in row.items())


def test_sweep_png_has_one_panel_per_metric(tmp_path):
  paths = sweep_report.write_sweep_report(SWEEP, 12, tmp_path)
  height, width, _ = _png_shape(paths["png"])
  one = sweep_report.plot_sweep(SWEEP, 12, tmp_path / "one.png", metrics=["loss"])
  one_height, one_width, _ = _png_shape(one)
  assert height == one_height and width > 3 * one_width  # four panels side by side
  with pytest.raises(ValueError, match="no metric to plot"):
    sweep_report.plot_sweep({1: {"tokens": 5.0}}, 1, tmp_path / "none.png")


def test_hop_table_and_heatmap(tmp_path):
  accuracy = {
    1: {1: 0.5, 6: 0.875, 12: 1.0, 24: 1.0},
    2: {1: 0.25, 6: 0.625, 12: 0.96875, 24: 0.9375},
    3: {1: 0.125, 6: 0.375, 12: 0.90625},  # K'=24 not run for 3 hops
  }
  paths = sweep_report.write_hop_report(accuracy, 12, tmp_path / "hops")
  assert paths["csv"].read_text().splitlines()[0] == "hops,loops=1,loops=6,loops=12,loops=24"
  assert sweep_report.read_hop_table(paths["csv"]) == accuracy
  height, width, _ = _png_shape(paths["png"])
  assert width > height  # four K' columns, three hop rows


# ----------------------------------------------------------------------------- h change


def _model(variant, loops=4):
  shape = dict(n_layer=2, d_model=32, n_head=2, n_kv_head=2, vocab_size=64, seq_len=16)
  return LoopedTransformer(
    model_config(**shape, loops=loops, variant=variant, window_pattern="L", kv_lora_rank=0)
  )


def _tokens(batch=2, length=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (batch, length)), jnp.int32)


def _random_params(model, seed=0):
  return random_params(model.cfg, seed)


def test_h_change_is_zero_at_a_fixed_point():
  """With every output projection (c_proj) zero, each block is the identity (as at init):
  FLT restarts from the embedding every loop and computes the same h each time."""
  model = _model("FLT")
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.zeros_like(x) if "c_proj" in jax.tree_util.keystr(path) else x,
    _random_params(model),
  )
  per_loop = sweep_report.h_change_per_loop(model, params, _tokens(), 4)
  assert per_loop.shape == (3,)
  np.testing.assert_array_equal(per_loop, 0.0)
  assert sweep_report.loop_h_change(model, params, _tokens(), 4) == 0.0
  assert math.isnan(sweep_report.loop_h_change(model, params, _tokens(), 1))


def test_h_change_matches_numpy_from_separate_loop_counts():
  model = _model("LT")
  params = _random_params(model)
  tokens = _tokens()
  mask = np.ones(tokens.shape, bool)
  mask[1, 5:] = False  # padding: left out of the mean

  def last_h(loops):
    apply = jax.jit(
      lambda p, t: model.apply({"params": p}, t, loops, method=model.hidden_states)[0]
    )
    return np.asarray(apply(params, tokens), np.float64)

  previous, last = last_h(2), last_h(3)
  relative = np.linalg.norm(last - previous, axis=-1) / np.linalg.norm(previous, axis=-1)
  want = relative[mask].mean()
  got = sweep_report.loop_h_change(model, params, tokens, 3, mask)
  assert want > 1e-3  # random weights: the last loop still moves h
  assert got == pytest.approx(want, rel=1e-4)
  assert sweep_report.sweep_h_change(model, params, tokens, [3], mask) == {3: got}
