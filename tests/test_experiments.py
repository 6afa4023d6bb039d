"""Every experiment file loads with every preset into a complete, valid config."""

import importlib.util
from pathlib import Path

import pytest

from flt_jax import config as flt_config
from flt_jax import run
from flt_jax.data import synthetic

EXPERIMENTS = sorted(
  p
  for p in (Path(__file__).parents[1] / "experiments").glob("*.py")
  if p.stem not in ("__init__", "base")
)


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_papers_experiments_are_all_there():
  names = {p.stem for p in EXPERIMENTS}
  assert {
    "flt_12loop",
    "flt_res_12loop",
    "lt_12loop",
    "lt_i_12loop",
    "lt_ia_12loop",
    "flt_6loop",
    "flt_9loop",
  } <= names


@pytest.mark.parametrize("preset", [None, "cpu", "multihop", "paper"])
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_presets_are_valid(path, preset):
  c = load(path).get_config(preset)
  flt_config.check_keys(c)
  if path.stem.endswith("loop"):  # <variant>_<K>loop
    loops = int(path.stem.split("_")[-1].removesuffix("loop"))
    assert c.model.loops == loops
    assert c.model.variant.lower() == path.stem.rsplit("_", 1)[0]
  if preset == "paper":
    assert (c.model.n_layer, c.model.d_model, c.model.seq_len) == (6, 384, 1024)
    assert c.train.total_batch_tokens == 524_288
    c.data.path, c.data.tokenizer_path = "/data/*.parquet", "/data/tokenizer.json"
  run.resolve_config(c)  # every section, as a run checks it (vocab 0 = the tokenizer's)


def test_multihop_preset_trains_on_answers_of_one_to_three_hops():
  c = load(next(p for p in EXPERIMENTS if p.stem == "flt_12loop")).get_config("multihop")
  assert c.data.source == "multihop" and c.data.loss_on_answer_only
  assert (c.data.multihop.hops_min, c.data.multihop.hops_max) == (1, 3)
  # The longest example fills a row exactly (seq_len + 1 tokens): no padding is trained on.
  assert synthetic.max_example_length(c.data) == c.model.seq_len + 1


def test_random_loop_preset_is_the_fixed_k_multihop_preset_with_random_counts():
  """experiments/flt_random.py:multihop: the same task, shape and recipe as
  flt_12loop.py:multihop; loop counts of mean 6 up to 16, gradient through 4 loops."""
  random = load(next(p for p in EXPERIMENTS if p.stem == "flt_random")).get_config("multihop")
  fixed = load(next(p for p in EXPERIMENTS if p.stem == "flt_12loop")).get_config("multihop")
  got, want = random.to_dict(), fixed.to_dict()
  assert (got["model"]["loop_sampling"], got["model"]["loops"]) == ("poisson_lognormal", 6)
  assert (got["model"]["max_loops"], got["model"]["backprop_loops"]) == (16, 4)
  for section in ("data", "optim", "train", "checkpoint", "mesh"):
    assert got[section] == want[section], section
  changed = {k for k in want["model"] if got["model"][k] != want["model"][k]}
  assert changed == {"loops", "loop_sampling", "max_loops", "backprop_loops"}


def test_unknown_preset_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown preset 'tiny'.*cpu"):
    load(EXPERIMENTS[0]).get_config("tiny")
