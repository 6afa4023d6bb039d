"""Multi-host training simulated with two processes on this machine (jax.distributed over
localhost, two CPU devices each): each host feeds only its share of the batch, process 0
alone writes metrics, both save their data-iterator state, and a run resumed across hosts
from its step-2 checkpoint continues exactly like the uninterrupted one. One process then
evaluates the two-host checkpoint (restore onto another mesh)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from flt_jax import run
from tests.helpers.runs import logged_losses

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_hosts(workdir: Path, steps: int) -> list[dict]:
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(process_id),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, str(WORKER), str(workdir), str(steps)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-6000:]
  return [json.loads((workdir / f"summary_process{i}.json").read_text()) for i in range(2)]


def test_two_hosts_train_resume_and_evaluate_on_one(tmp_path):
  full = _two_hosts(tmp_path / "full", 4)
  assert [r["devices"] for r in full] == [4, 4]
  assert full[0]["summary"] == full[1]["summary"]  # every host computed the same step
  # Process 0 alone logs: one record per step.
  steps_logged = [
    json.loads(line)["step"]
    for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    if "train/loss" in line
  ]
  assert steps_logged == [1, 2, 3, 4]
  data_states = sorted(p.name for p in (tmp_path / "full/checkpoints/4/data").glob("*.json"))
  assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
  # Each host's data position is checksummed in the record (process 0 writes it).
  metadata = json.loads((tmp_path / "full/checkpoints/4/_CHECKPOINT_METADATA").read_text())
  assert len(metadata["custom_metadata"]["flt_record"]["item_checksums"]["data"]) == 2

  # The same run stopped after its step-2 checkpoint, resumed on two hosts.
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed/checkpoints/4")
  resumed = _two_hosts(tmp_path / "resumed", 4)
  assert resumed[0]["summary"]["step"] == 4
  steps_logged = [
    json.loads(line)["step"]
    for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    if "train/loss" in line
  ]
  assert steps_logged == [1, 2, 3, 4, 3, 4]  # steps 3 and 4 trained again, nothing else
  want, got = logged_losses(tmp_path / "full"), logged_losses(tmp_path / "resumed")
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-6)
  np.testing.assert_allclose(
    resumed[0]["summary"]["eval_loss"], full[0]["summary"]["eval_loss"], rtol=1e-6
  )

  # The two-host checkpoint evaluated in this single process (one device).
  results = run.evaluate_checkpoint(None, str(tmp_path / "full"), [2])
  np.testing.assert_allclose(results[2]["loss"], full[0]["summary"]["eval_loss"], rtol=1e-5)
