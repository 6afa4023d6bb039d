"""What a run and its readers write survives kills and full disks, and what they read is
verified: eval tables, exports, metrics lines, the saved data-stream position and the
checkpoint record."""

import json
import shutil

import numpy as np
import pytest

from flt_jax import export, files, run
from flt_jax.train import metrics as metrics_lib
from flt_jax.train.checkpoint import CorruptCheckpointError
from tests.helpers.runs import checkpoint_listing, tiny_run_config


class _Killed(BaseException):
  """The process 'dies' here: nothing after this point runs (tests/test_files.py kills a
  real process at the same point)."""


def _die(*_):
  raise _Killed()


def _copy(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def test_a_sweep_killed_while_writing_keeps_the_earlier_table(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  run.evaluate_checkpoint(None, str(workdir), [1])
  table_path = workdir / "eval_step3.json"
  before = table_path.read_text()
  csv_before = (workdir / "loop_sweep_step3.csv").read_text()
  with monkeypatch.context() as m:
    m.setattr(files.os, "fsync", _die)
    with pytest.raises(_Killed):
      run.evaluate_checkpoint(None, str(workdir), [2])
  assert table_path.read_text() == before
  assert (workdir / "loop_sweep_step3.csv").read_text() == csv_before
  run.evaluate_checkpoint(None, str(workdir), [2])  # the next sweep adds its K'
  assert sorted(json.loads(table_path.read_text())["loops"]) == ["1", "2"]


def test_a_damaged_sweep_table_is_named_before_the_sweep(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  (workdir / "eval_step3.json").write_text("")  # e.g. a 0-byte file from an older version
  with pytest.raises(ValueError) as e:
    run.evaluate_checkpoint(None, str(workdir), [1])
  msg = str(e.value)
  assert str(workdir / "eval_step3.json") in msg and "move it aside" in msg and "\n" not in msg
  assert not (workdir / "loop_sweep_step3.csv").exists()


def test_a_sweep_on_other_data_writes_under_its_own_name(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  own = run.evaluate_checkpoint(None, str(workdir), [1])
  table = json.loads((workdir / "eval_step3.json").read_text())
  assert table["data"]["source"] == "multihop"
  other = tiny_run_config()
  other.data.multihop.hops_max = 1  # another validation set
  other_results = run.evaluate_checkpoint(other, str(workdir), [1])
  assert json.loads((workdir / "eval_step3.json").read_text()) == table  # untouched
  others = sorted(p.name for p in workdir.glob("eval_step3_data-*.json"))
  assert len(others) == 1
  assert json.loads((workdir / others[0]).read_text())["loops"]["1"]["loss"] == pytest.approx(
    other_results[1]["loss"]
  )
  assert other_results[1]["loss"] != own[1]["loss"]
  assert len(list(workdir.glob("loop_sweep_step3_data-*.csv"))) == 1


def test_an_export_killed_while_writing_keeps_the_previous_file(trained, tmp_path, monkeypatch):
  out = tmp_path / "model.npz"
  export.export_npz(str(trained), str(out))
  before = dict(np.load(out))
  with monkeypatch.context() as m:
    m.setattr(files.os, "fsync", _die)
    with pytest.raises(_Killed):
      export.export_npz(str(trained), str(out))
  after = dict(np.load(out))
  assert sorted(after) == sorted(before)
  assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_a_bad_export_path_is_one_line_before_the_restore(trained, tmp_path, where, capsys):
  if where == "directory":
    out = tmp_path
  else:
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "model.npz"
  with pytest.raises(files.FileWriteError) as e:
    export.export_npz(str(trained), str(out))
  assert "\n" not in str(e.value) and "Fix:" in str(e.value)
  assert "devices:" not in capsys.readouterr().out  # refused before the restore


def test_metrics_that_do_not_fit_warn_once_and_training_goes_on(tmp_path, monkeypatch):
  warnings = []
  writer = metrics_lib.MetricsWriter(tmp_path, enabled=False, jsonl=True, warn=warnings.append)
  writer.write_scalars(1, {"train/loss": 2.0})
  real = files.os.write
  monkeypatch.setattr(files.os, "write", lambda fd, data: real(fd, data[:3]))
  writer.write_scalars(2, {"train/loss": 1.9})
  writer.write_scalars(3, {"train/loss": 1.8})
  monkeypatch.setattr(files.os, "write", real)
  writer.write_scalars(4, {"train/loss": 1.7})
  writer.close()
  assert len(warnings) == 1 and "metrics of step 2 not saved" in warnings[0]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 4]


def test_an_edited_data_position_is_refused_on_resume(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  (state_file,) = (workdir / "checkpoints" / "3" / "data").glob("process_0-of-1.json")
  state = json.loads(state_file.read_text())
  state["next_index"] = int(state.get("next_index", 0)) + 7
  state_file.write_text(json.dumps(state, indent=4))
  before = checkpoint_listing(workdir)
  c = tiny_run_config()
  c.train.steps = 5
  with pytest.raises(CorruptCheckpointError) as e:
    run.train_and_evaluate(c, str(workdir))
  msg = str(e.value)
  assert "'data' item" in msg and "restore_data=False" in msg and "\n" not in msg
  assert checkpoint_listing(workdir) == before
  c.checkpoint.restore_data = False  # the way out it names
  assert run.train_and_evaluate(c, str(workdir))["step"] == 5


def test_a_deleted_record_is_refused_not_skipped(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  # The record is kept in Orbax's step metadata file (a legacy `record` item:
  # tests/train/test_checkpoint.py).
  (workdir / "checkpoints" / "3" / "_CHECKPOINT_METADATA").unlink()
  c = tiny_run_config()
  c.train.steps = 5
  with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA .* is missing"):
    run.train_and_evaluate(c, str(workdir))
  with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA .* is missing"):
    run.restore_params(str(workdir))


@pytest.mark.parametrize("text", ["", '{"fixed": {}}', '{"fixed": [], "exit": {}}'])
def test_a_damaged_exit_table_is_named_and_a_missing_one_is_empty(tmp_path, text):
  from etils import epath

  from flt_jax.run import results

  path = epath.Path(tmp_path) / "exit_step3.json"
  assert results.read_exit_table(path) == {"fixed": {}, "exit": {}}
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    results.read_exit_table(path)
  msg = str(e.value)
  assert str(path) in msg and "per-token exit table" in msg and "\n" not in msg
