"""The stability study command on a tiny two-run configuration."""

import csv

import pytest

from flt_jax import study

TINY = [
  "model.loops=3",
  "model.n_layer=1",
  "model.d_model=32",
  "model.seq_len=32",
  "train.micro_batch_size=4",
  "train.total_batch_tokens=128",
  "train.eval_steps=1",
  "checkpoint.every_steps=100",
]


def test_study_writes_figure_and_summary(tmp_path):
  table = study.run_study(
    ["lt_12loop", "flt_12loop"], out=tmp_path, steps=4, log_every=2, overrides=TINY
  )
  png = (tmp_path / "study.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000
  rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
  assert [r["run"] for r in rows] == ["lt_12loop", "flt_12loop"]
  for r in rows:
    assert float(r["final_train_loss"]) > 0 and float(r["final_val_loss"]) > 0
    assert float(r["max_residual_norm"]) > 0 and float(r["max_grad_norm"]) > 0
    assert r["diverged"] in ("yes", "no")
  assert "flt_12loop" in table and (tmp_path / "summary.md").read_text() == table


def test_unknown_experiment_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no experiment 'nope'.*flt_12loop"):
    study.run_study(["nope"], out=tmp_path, steps=1, log_every=1)
