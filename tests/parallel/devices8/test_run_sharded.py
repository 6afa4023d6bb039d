"""The run layer (what `python -m flt_jax.main` calls) on a (data=2, fsdp=4) mesh of 8
simulated devices: trains two steps with sharded eval and checkpoints them. The parent
process (tests/parallel/test_devices8.py) compares the losses with a one-device run and
resumes this checkpoint on one device."""

from __future__ import annotations

import os

import jax

from flt_jax import run
from tests.helpers.runs import two_micro_batch_config


def test_run_layer_trains_and_checkpoints_on_the_mesh(capsys):
  workdir = os.path.join(os.environ.get("FLT_DEVICES8_OUT") or "/tmp", "run8")
  summary = run.train_and_evaluate(two_micro_batch_config(steps=2, data=2, fsdp=4), workdir)
  assert summary["step"] == 2
  printed = capsys.readouterr().out
  assert "data=2 fsdp=4 tensor=1 (8 devices" in printed  # the startup line
  run_setup = run.setup(two_micro_batch_config(steps=2, data=2, fsdp=4), workdir, training=False)
  checkpointer = run.open_checkpointer(run_setup, workdir, read_only=True)
  state = checkpointer.restore(2, run_setup.restore_target)["state"]
  checkpointer.close()
  kernel = state.params["blocks"]["layers"]["block"]["mlp"]["c_fc"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert jax.device_count() == 8
