"""Starting from a checkpoint: eval, sample and export (run.restore_checkpoint) and a
resumed training run read the saved config and the record once each, and a reader on a
cluster joins it before Orbax starts JAX's backends."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from flt_jax import export, run, sample
from tests.helpers.runs import main_command, tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def test_each_start_reads_the_saved_config_and_the_record_once(trained, tmp_path, orbax_reads):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  resumed = tiny_run_config()
  resumed.train.update(steps=4, eval_every=0)
  starts = {
    "eval": lambda: run.evaluate_checkpoint(None, str(workdir), [1]),
    "sample": lambda: sample.generate_text(str(workdir), "1", max_new_tokens=1),
    "export": lambda: export.export_npz(str(workdir), str(tmp_path / "x.npz")),
    "resumed run": lambda: run.train_and_evaluate(resumed, str(workdir)),
  }
  for name, start in starts.items():
    orbax_reads.clear()
    start()
    reads = {item: orbax_reads.count(item) for item in ("config", "metadata", "state")}
    assert reads == {"config": 1, "metadata": 1, "state": 1}, (name, orbax_reads)
  assert run.restore_checkpoint(str(workdir)).step == 4


_EXPORT_ON_A_CLUSTER = """
import sys
import jax
from flt_jax import export
print(export.export_npz(sys.argv[1], sys.argv[2])["step"], jax.distributed.is_initialized())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_a_reader_joins_its_cluster_before_orbax_starts_jax(trained, tmp_path):
  """A cluster of one process (jax.distributed over localhost): the reader must call
  jax.distributed.initialize before anything starts JAX's backends, Orbax included."""
  out = tmp_path / "x.npz"
  proc = subprocess.run(
    [sys.executable, "-c", _EXPORT_ON_A_CLUSTER, str(trained), str(out)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
      JAX_NUM_PROCESSES="1",
      JAX_PROCESS_ID="0",
    ),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["3", "True"]
  assert np.load(out).files


def test_a_run_trained_on_a_cluster_reads_back_on_one_machine(tmp_path):
  """mesh.distributed describes the machine that trained (the launch scripts set it on),
  not the model: a reader on a plain machine must not try to join that cluster."""
  workdir = tmp_path / "run"
  cluster = dict(
    os.environ,
    JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
    JAX_NUM_PROCESSES="1",
    JAX_PROCESS_ID="0",
  )
  train = subprocess.run(
    main_command(workdir, "--config.train.steps=1", "--config.mesh.distributed=on"),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=cluster,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  out = tmp_path / "x.npz"
  proc = subprocess.run(
    [sys.executable, "-c", _EXPORT_ON_A_CLUSTER, str(workdir), str(out)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["1", "False"]
