"""The command line: bad overrides are clear errors and write nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
  "override,message",
  [
    (
      "--config.model.n_layers=3",
      "unknown config key --config.model.n_layers: config.model has no field 'n_layers' "
      "(did you mean config.model.n_layer?)",
    ),
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


def test_configs_load_from_any_working_directory(tmp_path):
  """Only flt_jax importable (not the repository root): the experiment file is loaded by
  its path and finds its presets in the package."""
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "flt_jax").symlink_to(REPO / "flt_jax")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "flt_jax.main",
      f"--config={REPO / 'experiments' / 'lt_12loop.py'}:multihop",
      "--print_config",
    ],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "variant: LT" in proc.stdout and "source: multihop" in proc.stdout


def test_help_points_to_the_config_reference():
  proc = _main("--help")
  assert 'README.md ("Configuration")' in proc.stdout
  readme = (REPO / "README.md").read_text()
  assert "\n## Configuration\n" in readme and "--print_config" in readme


@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--config=experiments/flt_12loop.py:nope"],
      "error: flag --config=experiments/flt_12loop.py:nope: Error whilst parsing config file: "
      "ValueError: unknown preset 'nope'",
    ),
    (
      ["--config=experiments/nope.py"],
      "error: --config: cannot load the config file: [Errno 2] No such file or directory",
    ),
    (
      ["--config=experiments/flt_12loop.py", "--config.data.source=text"],
      "error: config.data.path='' is invalid: data.source='text' needs a file glob",
    ),
    (
      [
        "--config=experiments/flt_12loop.py",
        "--config.data.source=text",
        "--config.data.path=/nonexistent/*.txt",
      ],
      "error: config.data.path='/nonexistent/*.txt' is invalid: it matched no files",
    ),
    (
      [
        "--config=experiments/flt_12loop.py",
        "--config.data.tokenizer=file",
        f"--config.data.tokenizer_path={REPO / 'README.md'}",
      ],
      f"error: data.tokenizer_path='{REPO / 'README.md'}' is not a readable tokenizer.json",
    ),
    (["--config=experiments/flt_12loop.py", "--config.train.steps=-5"], "config.train.steps=-5"),
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
  assert len([line for line in proc.stderr.splitlines() if line.startswith("error")]) == 1
  assert message in proc.stderr.splitlines()[-1]  # the error is the last line, whole
  assert not workdir.exists()
