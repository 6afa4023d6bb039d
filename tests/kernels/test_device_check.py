"""benchmarks/device_check.py on the CPU: its arguments, and a dry run at tiny shapes whose
table reports a passing part, a failing one and one out of time without stopping."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import device_check  # noqa: E402


def test_arguments_are_checked():
  args = device_check.parse_args([])
  assert args.parts == ["tests", "numerics", "attention", "train"] and args.budget_s == 480
  for bad in (["--parts=tests,speed"], ["--budget_s=10"]):
    with pytest.raises(SystemExit):
      device_check.parse_args(bad)
  # The parts' shares leave slack for process start-up within the budget.
  assert sum(device_check.SHARES.values()) < 1


def test_the_table_lines_up_every_row():
  rows = [
    device_check.Row("tests", "kernels", "ok", "3 passed"),
    device_check.Row("train", "pallas", "TIMEOUT", "stopped after 40 s"),
  ]
  lines = device_check.format_table(rows, "device check: test").splitlines()
  assert lines[0] == "device check: test"
  header, first, second = lines[1:]
  column = header.index("status")
  assert first[column:].split() == ["ok", "3", "passed"] and second[column:].startswith("TIMEOUT")


def _check(*args, tmp_path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "benchmarks/device_check.py", "--dry_run", f"--log_dir={tmp_path}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_failing_part_is_a_row_and_the_others_still_run(tmp_path):
  proc = _check("--parts=train,tests", "--impls=cudnn", "--budget_s=120", tmp_path=tmp_path)
  assert proc.returncode == 1, proc.stdout + proc.stderr  # not every row passed
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("device check: 1 x cpu (cpu), jax ") and "dry run" in lines[0]
  train, tests = lines[2], lines[3]
  assert train.split()[:3] == ["train", "cudnn", "FAILED"], proc.stdout
  assert "attention_impl='cudnn' is invalid: it cannot run on cpu" in train, train
  assert tests.split()[0] == "tests" and " ok " in tests and "passed" in tests, proc.stdout
  assert (tmp_path / "train_cudnn.log").exists() and (tmp_path / "tests.log").exists()


def test_a_part_out_of_time_is_stopped_and_reported(tmp_path):
  # numerics gets 10% of 30 s: too little to start JAX and compile at all.
  proc = _check("--parts=numerics", "--budget_s=30", tmp_path=tmp_path)
  assert proc.returncode == 1
  assert "numerics  numerics  TIMEOUT  stopped after 3 s" in proc.stdout, proc.stdout
