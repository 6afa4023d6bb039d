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
