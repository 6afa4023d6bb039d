"""The command line: bad overrides are clear errors and write nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.model.n_layers=3", "unknown config key in ['--config.model.n_layers']"),
    ("--config.model.loops=x", "flag --config.model.loops=x: invalid literal"),
    ("--config.model.variant=XLT", "config.model.variant='XLT' is invalid"),
  ],
)
def test_bad_override_is_a_clear_error(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "flt_jax.main",
      "--config=experiments/flt_12loop.py",
      f"--workdir={workdir}",
      override,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert message in proc.stderr + proc.stdout
  assert not workdir.exists()


def _main(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", "flt_jax.main", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_print_config_prints_the_resolved_config_and_exits():
  proc = _main("--config=experiments/flt_12loop.py", "--config.model.loops=7", "--print_config")
  assert proc.returncode == 0, proc.stderr
  assert "loops: 7" in proc.stdout and "mesh:" in proc.stdout


@pytest.mark.parametrize(
  "args,message",
  [
    (["--mode=eval", "--eval_loops=1,,2"], "--eval_loops=1,,2 must be positive integers"),
    (["--mode=eval", "--eval_loops=a"], "--eval_loops=a must be positive integers"),
    (["--mode=eval"], "no checkpoints in"),
    (["--mode=train"], "--mode=train needs --config=FILE"),
  ],
)
def test_command_line_errors_are_one_line(tmp_path, args, message):
  workdir = tmp_path / "run"
  proc = _main(f"--workdir={workdir}", *args)
  assert proc.returncode != 0
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not workdir.exists()
