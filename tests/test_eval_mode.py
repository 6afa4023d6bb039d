"""`--mode=eval` under the main command, as a user runs it."""

import subprocess
from pathlib import Path

from flt_jax import run
from tests.helpers.runs import main_command, tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def test_eval_mode_applies_the_configs_cpu_devices_without_a_warning(tmp_path):
  c = tiny_run_config()
  c.train.update(steps=2, eval_every=0)
  run.train_and_evaluate(c, str(tmp_path / "run"))
  out = subprocess.run(
    main_command(
      tmp_path / "run",
      "--mode=eval",
      "--eval_loops=1",
      "--config.train.steps=2",
      "--config.mesh.cpu_devices=2",  # the cpu preset's two CPU devices
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  assert "not applied" not in out.stdout + out.stderr
  assert "loops   1:" in out.stdout
