"""Readers beside a live run: eval, sample, export and a refused second training run never
touch the live run's files (its in-flight save above all)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flt_jax import export, run, sample
from flt_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from tests.helpers.runs import checkpoint_listing, main_command, tiny_run_config

REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = "4.orbax-checkpoint-tmp-1234567"  # Orbax's name for a save being written


def _hold_lock_for(workdir: Path, pid: int) -> None:
  """run.lock as a live run on this host with process `pid` writes it."""
  lock = WorkdirLock(workdir)
  record = lock._record()  # noqa: SLF001 (the lock's own format)
  record["pid"] = pid
  record["pid_start"] = None
  (workdir / LOCK_NAME).write_text(json.dumps(record))


def _readers(workdir: Path, out_dir: Path, live=None) -> None:
  """Every reader once: eval at K'=1, export, sample, and a second training run, refused
  while the run holding the workdir (`live`, a Popen, or this test's lock) is alive."""
  run.evaluate_checkpoint(None, str(workdir), [1])
  export.export_npz(str(workdir), str(out_dir / "x.npz"))
  sample.generate_text(str(workdir), "1", max_new_tokens=2, write=lambda _: None)
  c = tiny_run_config()
  c.train.steps = 1  # if the live run has just finished, this one has nothing to do
  try:
    run.train_and_evaluate(c, str(workdir))
  except WorkdirLockedError:
    return
  # Not refused: only once the live run has released the lock, after its last save (its
  # process may still be exiting).
  assert live is not None, "a second run was not refused"
  live.wait(timeout=120)


def test_readers_leave_an_in_flight_save_alone(tmp_path):
  workdir = tmp_path / "run"
  c = tiny_run_config()
  c.train.steps = 3
  run.train_and_evaluate(c, str(workdir))
  # A live run (a process that is alive: this one's child) holding the workdir, with a
  # save being written.
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  try:
    _hold_lock_for(workdir, holder.pid)
    in_flight = workdir / "checkpoints" / IN_FLIGHT
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "part").write_bytes(b"being written")
    before = checkpoint_listing(workdir)
    _readers(workdir, tmp_path)
    assert checkpoint_listing(workdir) == before
    assert (in_flight / "state" / "part").read_bytes() == b"being written"
    assert (workdir / LOCK_NAME).exists()
  finally:
    holder.kill()
    holder.wait()


def test_readers_work_on_a_read_only_workdir(tmp_path):
  workdir = tmp_path / "run"
  c = tiny_run_config()
  c.train.steps = 3
  run.train_and_evaluate(c, str(workdir))
  before = checkpoint_listing(workdir)
  os.chmod(workdir / "checkpoints", 0o555)
  try:
    params = export.export_npz(str(workdir), str(tmp_path / "x.npz"))
    assert params["step"] == 3
    text = sample.generate_text(str(workdir), "1", max_new_tokens=2, write=lambda _: None)
    assert isinstance(text, str)
  finally:
    os.chmod(workdir / "checkpoints", 0o755)
  assert checkpoint_listing(workdir) == before


def test_readers_in_a_loop_beside_a_run_that_saves_every_step(tmp_path):
  workdir = tmp_path / "live"
  steps = 30
  cmd = main_command(
    workdir,
    f"--config.train.steps={steps}",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.keep=0",
    "--config.train.eval_every=0",
    "--config.train.log_every=10",
  )
  live = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  rounds = 0
  try:
    deadline = time.time() + 240
    while not (workdir / "checkpoints").is_dir() or not any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    ):
      assert live.poll() is None, live.stdout.read().decode()
      assert time.time() < deadline
      time.sleep(0.2)
    while live.poll() is None:
      _readers(workdir, tmp_path, live)
      rounds += 1
  finally:
    if live.poll() is None:
      live.kill()
    output = live.communicate()[0].decode()
  assert live.returncode == 0, output
  assert rounds >= 1, output
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == list(range(1, steps + 1)), output
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert np.load(tmp_path / "x.npz").files
