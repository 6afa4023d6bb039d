"""run/fits.py: a run that cannot fit is refused before it starts, with an estimate, and
before the workdir is touched."""

import json
import subprocess
import sys

import pytest

from flt_jax import run
from flt_jax.errors import ConfigError
from flt_jax.run import fits
from flt_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from tests.helpers.runs import tiny_run_config


def test_a_batch_the_host_cannot_hold_is_refused_with_an_estimate(tmp_path):
  c = tiny_run_config()
  c.train.total_batch_tokens = 1024000000000 - 1024000000000 % 96
  with pytest.raises(ConfigError) as e:
    run.train_and_evaluate(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith("config.train.total_batch_tokens=") and "GiB of host memory" in msg
  assert "is available" in msg and "\n" not in msg
  assert not (tmp_path / "run").exists()


def test_a_step_a_device_cannot_hold_is_refused_with_xlas_estimate(tmp_path, monkeypatch):
  monkeypatch.setattr(fits, "device_bytes", lambda device: 1 << 16)  # a 64 KiB device
  with pytest.raises(ConfigError) as e:
    run.train_and_evaluate(tiny_run_config(), str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith("config.train.micro_batch_size=4 is invalid: the train step needs ")
  assert "XLA's memory analysis" in msg and "0.00 GiB" in msg and "\n" not in msg
  assert not (tmp_path / "run").exists()


def test_the_estimate_is_xlas_memory_analysis(tmp_path):
  run_setup = run.setup(tiny_run_config(), str(tmp_path), training=True)
  compiled = run_setup.compile_train_step()
  m = compiled.memory_analysis()
  need = fits.memory_bytes(compiled)
  assert need == (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  assert need > 0
  fits.check_step(run_setup, compiled)  # fits this machine


def test_a_second_run_is_refused_before_it_compiles(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  try:
    record = WorkdirLock(workdir)._record()  # noqa: SLF001 (the lock's own format)
    record.update(pid=holder.pid, pid_start=None)
    (workdir / LOCK_NAME).write_text(json.dumps(record))

    def compile_train_step(*args, **kwargs):
      raise AssertionError("compiled before the lock was checked")

    monkeypatch.setattr(run.RunSetup, "compile_train_step", compile_train_step)
    with pytest.raises(WorkdirLockedError):
      run.train_and_evaluate(tiny_run_config(), str(workdir))
  finally:
    holder.kill()
    holder.wait()


def test_a_diverged_run_warns_and_says_so_in_its_summary(tmp_path, capsys):
  c = tiny_run_config()
  c.train.update(steps=4, eval_every=0, log_every=1)
  c.optim.update(matrix_lr=1e4, embedding_lr=1e4, unembedding_lr=1e4, grad_clip=0.0)
  summary = run.train_and_evaluate(c, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert summary["diverged_step"] is not None and summary["final_loss"] > 5
  assert out.count("the run has diverged") == 1  # warned once
  assert f"DIVERGED since step {summary['diverged_step']}" in out.splitlines()[-1]
  # A run that trains normally says nothing of the kind.
  summary = run.train_and_evaluate(tiny_run_config(), str(tmp_path / "ok"))
  assert summary["diverged_step"] is None
  assert "diverged" not in capsys.readouterr().out.lower()


def test_a_run_stopped_by_nonfinite_updates_before_any_save_says_so(tmp_path):
  c = tiny_run_config()
  c.train.update(steps=6, eval_every=0, log_every=1, max_consecutive_nonfinite=2)
  c.optim.update(matrix_lr=1e30, embedding_lr=1e30, unembedding_lr=1e30, grad_clip=0.0)
  with pytest.raises(run.NonFiniteError) as e:
    run.train_and_evaluate(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "No checkpoint had been saved yet" in msg and "is intact" not in msg
