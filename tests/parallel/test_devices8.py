"""Runs tests/parallel/devices8 on 8 simulated CPU devices in a separate process (the
device count is fixed when JAX starts), then restores the checkpoint it wrote on 8
devices here, on this process's single device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from flt_jax import run as run_lib
from tests.helpers.runs import REPO, logged_eval_losses, logged_losses, two_micro_batch_config
from tests.parallel import common


def test_eight_devices_then_restore_on_one(tmp_path):
  # FLT_DEVICES8=1: tests/conftest.py gives the child eight CPU devices.
  env = dict(os.environ, FLT_DEVICES8="1", FLT_DEVICES8_OUT=str(tmp_path))
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/parallel/devices8"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout

  # The checkpoint written after two steps on the (data=2, fsdp=2, tensor=2) mesh,
  # restored onto one device: the third step's loss matches the 8-device run.
  expected = json.loads((tmp_path / "expected.json").read_text())
  assert jax.device_count() == 1
  run = common.ShardedRun(common.program("gqa", jax.devices(), data=1, fsdp=1, tensor=1))
  state = ocp.StandardCheckpointer().restore(expected["checkpoint"], run.abstract())
  assert int(state.step) == 2
  _, losses = run.run(state, common.host_batches(3)[2:])
  np.testing.assert_allclose(losses[0], expected["loss_step3"], rtol=1e-5, atol=1e-5)

  # The run layer: the 8-device run's first two steps and its eval match one device,
  # and its checkpoint resumes here on one device to the same steps 3 and 4.
  reference = run_lib.train_and_evaluate(two_micro_batch_config(steps=4), str(tmp_path / "ref1"))
  ref_losses = logged_losses(tmp_path / "ref1")
  eight = logged_losses(tmp_path / "run8")
  np.testing.assert_allclose([eight[1], eight[2]], [ref_losses[1], ref_losses[2]], rtol=1e-5)
  eval8_step2 = logged_eval_losses(tmp_path / "run8")[2]
  resumed = run_lib.train_and_evaluate(two_micro_batch_config(steps=4), str(tmp_path / "run8"))
  assert resumed["step"] == 4
  after = logged_losses(tmp_path / "run8")
  np.testing.assert_allclose([after[3], after[4]], [ref_losses[3], ref_losses[4]], rtol=1e-5)
  np.testing.assert_allclose(resumed["eval_loss"], reference["eval_loss"], rtol=1e-5)
  np.testing.assert_allclose(eval8_step2, logged_eval_losses(tmp_path / "ref1")[2], rtol=1e-5)
