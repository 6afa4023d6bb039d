"""Random loop counts through the run layer: the count logged per step (metrics.jsonl,
console) is the host's draw for that step, a killed-and-resumed run draws the same counts
and logs the same losses, and the two-device mesh trains like one device."""

import json
import subprocess

import numpy as np
import pytest

from flt_jax import run
from flt_jax.model import loop_count
from flt_jax.model.config import ModelConfig
from flt_jax.train import checkpoint as checkpoint_lib
from tests.test_run import REPO, STEPS, losses, main_command, tiny_config

RANDOM = dict(loop_sampling="uniform", max_loops=4, backprop_loops=2, loss_type="STEP")


def random_config():
  c = tiny_config(**RANDOM)
  c.train.seed = 3
  return c


def logged(workdir, name):
  """step -> the metrics.jsonl value `name`, the last record of each step winning."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if name in rec:
      out[rec["step"]] = rec[name]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("random_uninterrupted")
  run.train_and_evaluate(random_config(), str(workdir))
  return workdir


def test_each_step_logs_the_count_it_drew(uninterrupted):
  cfg = ModelConfig.from_config(random_config().model, 64)
  want = loop_count.draws_on_host(cfg, 3, range(STEPS))  # step s ran draw s - 1
  got = logged(uninterrupted, "train/loops")
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([got[s] for s in range(1, STEPS + 1)], want)
  assert len(set(want)) > 1  # the seed gives different counts: the test can fail
  means = logged(uninterrupted, "train/loops_mean")
  assert means[1] == want[0]  # log_every=1: the mean of one step
  # Per-loop scalars of the loops run only.
  for line in (uninterrupted / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "train/loops" in rec:
      run_loops = [k for k in rec if k.startswith("loops/residual_norm_")]
      assert len(run_loops) == int(rec["train/loops"]), rec


def test_console_shows_the_draw_and_the_distribution(tmp_path, capsys):
  c = random_config()
  c.train.steps = 1
  c.train.eval_every = 0
  run.train_and_evaluate(c, str(tmp_path / "console"))
  out = capsys.readouterr().out
  assert "FLT K~uniform(mean 2.50, 1..4) backprop 2 L=1" in out, out
  cfg = ModelConfig.from_config(c.model, 64)
  first = int(loop_count.draws_on_host(cfg, 3, [0])[0])
  assert f"| loops {first} |" in out, out


def test_resume_after_a_kill_draws_the_same_counts(uninterrupted, tmp_path, monkeypatch):
  """The run dies right after its step-3 checkpoint is durable; the rerun resumes there
  and logs the uninterrupted run's counts and losses for steps 4..6."""
  workdir = tmp_path / "killed"
  real_save = checkpoint_lib.Checkpointer.save

  class Killed(BaseException):
    pass

  def save_then_die(self, step, *args, **kwargs):
    out = real_save(self, step, *args, **kwargs)
    if out and int(step) == 3:
      self.wait_until_finished()
      raise Killed()
    return out

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_then_die)
  with pytest.raises(Killed):
    run.train_and_evaluate(random_config(), str(workdir))
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", real_save)
  assert max(losses(workdir)) == 3
  run.train_and_evaluate(random_config(), str(workdir))
  want_loops, got_loops = logged(uninterrupted, "train/loops"), logged(workdir, "train/loops")
  want, got = losses(uninterrupted), losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(4, STEPS + 1):
    assert got_loops[step] == want_loops[step], step
    np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-6)


def test_two_cpu_devices_draw_and_train_like_one(uninterrupted, tmp_path):
  """The sharded step on the cpu preset's two-device mesh: the same counts and losses."""
  workdir = tmp_path / "two_devices"
  flags = [f"--config.model.{k}={v}" for k, v in RANDOM.items()]
  cmd = main_command(workdir, *flags, "--config.train.seed=3", "--config.mesh.cpu_devices=2")
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "(2 devices, cpu)" in proc.stdout, proc.stdout
  assert logged(workdir, "train/loops") == logged(uninterrupted, "train/loops")
  want, got = losses(uninterrupted), losses(workdir)
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
