"""The run layer end to end: resume after SIGKILL, SIGTERM saves, bad input, eval sweep,
the non-finite stop rule, and no device reads between sync steps."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flt_jax import presets, run
from flt_jax.data import pipeline as data_pipeline
from flt_jax.eval import sweep_report
from flt_jax.run import loop
from flt_jax.train import step as step_lib
from flt_jax.train.checkpoint import Checkpointer
from flt_jax.workdir_lock import WorkdirLockedError
from tests.helpers.runs import (
  REPO,
  STEPS,
  checkpoint_listing,
  config_flags,
  logged_losses,
  main_command,
  tiny_run_config,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  summary = run.train_and_evaluate(tiny_run_config(), str(workdir))
  return workdir, summary


def test_trains_and_checkpoints(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["step"] == STEPS
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["eval_loss"])
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    3,
    6,
  ]
  assert sorted(logged_losses(workdir)) == list(range(1, STEPS + 1))
  assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_resume_after_sigkill_equals_uninterrupted_run(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  # The child kills itself with SIGKILL as soon as its step-3 checkpoint is durable.
  child = (
    "import os, signal, sys\n"
    "from flt_jax.train import checkpoint as c\n"
    "orig = c.Checkpointer.save\n"
    "def save(self, step, *a, **k):\n"
    "  out = orig(self, step, *a, **k)\n"
    "  if out and int(step) == 3:\n"
    "    self.wait_until_finished(); os.kill(os.getpid(), signal.SIGKILL)\n"
    "  return out\n"
    "c.Checkpointer.save = save\n"
    "from absl import app\n"
    "from flt_jax import main\n"
    "sys.argv = ['main'] + sys.argv[1:]\n"
    "app.run(main.main)\n"
  )
  cmd = [
    sys.executable,
    "-c",
    child,
    "--config=experiments/flt_12loop.py",
    f"--workdir={workdir}",
    "--config.model.loops=2",
  ] + config_flags(tiny_run_config())
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert max(logged_losses(workdir)) == 3
  summary = run.train_and_evaluate(tiny_run_config(), str(workdir))
  assert summary["step"] == STEPS
  logged = [
    json.loads(l)["step"]
    for l in (workdir / "metrics.jsonl").read_text().splitlines()
    if "train/loss" in l
  ]
  assert logged == list(range(1, STEPS + 1))  # resumed at 4, nothing retrained
  want, got = logged_losses(uninterrupted[0]), logged_losses(workdir)
  for step in range(4, STEPS + 1):
    np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-6)


def test_two_cpu_devices_train_like_one(uninterrupted, tmp_path):
  """The cpu preset's mesh (config.mesh.cpu_devices=2, batch over `data`) through the
  main command: the same losses as the one-device run in this process."""
  workdir = tmp_path / "two_devices"
  cmd = main_command(workdir, "--config.mesh.cpu_devices=2")
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "devices: data=2 fsdp=1 tensor=1 (2 devices, cpu)" in proc.stdout, proc.stdout
  want, got = logged_losses(uninterrupted[0]), logged_losses(workdir)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_the_step_it_reached(tmp_path, signum):
  workdir = tmp_path / "preempted"
  c = tiny_run_config()
  cmd = main_command(
    workdir,
    "--config.train.steps=100000",
    "--config.checkpoint.every_steps=100000",
    "--config.train.eval_every=0",
  )
  proc = subprocess.Popen(
    cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  try:
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() or not logged_losses(workdir):
      assert proc.poll() is None and time.time() < deadline, "training did not start"
      time.sleep(0.2)
    if signum == signal.SIGTERM:  # meanwhile, a second run on the workdir is refused
      with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid}"):
        run.train_and_evaluate(c, str(workdir))
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out[-2000:]
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 1
  assert f"stopped by a signal: saved step {saved[0]}" in out


def test_mismatched_workdir_is_refused_and_untouched(uninterrupted):
  workdir, _ = uninterrupted
  before = checkpoint_listing(workdir)
  with pytest.raises(ValueError, match=r"model.d_model: saved 32, now 64"):
    run.train_and_evaluate(tiny_run_config(d_model=64), str(workdir))
  assert checkpoint_listing(workdir) == before


def test_bad_input_is_a_clear_error(tmp_path):
  missing = tiny_run_config()
  del missing.train["seed"]
  with pytest.raises(ValueError, match=r"config.train=\['seed'\] is invalid: lacks these keys"):
    run.train_and_evaluate(missing, str(tmp_path / "a"))
  unknown = tiny_run_config()
  unknown.model.unlock()
  unknown.model.n_layers = 3
  with pytest.raises(ValueError, match=r"config.model=\['n_layers'\] is invalid: has unknown keys"):
    run.train_and_evaluate(unknown, str(tmp_path / "b"))
  indivisible = tiny_run_config()
  indivisible.train.total_batch_tokens = 100
  with pytest.raises(ValueError, match="total_batch_tokens"):
    run.train_and_evaluate(indivisible, str(tmp_path / "c"))
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="writable --workdir"):
    run.train_and_evaluate(tiny_run_config(), str(a_file / "run"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  negative = tiny_run_config()
  negative.train.steps = -5
  with pytest.raises(ValueError, match=r"config.train.steps=-5 is invalid"):
    run.train_and_evaluate(negative, str(tmp_path / "d"))


def test_divergence_counts_as_non_finite_and_stops(tmp_path):
  """A huge learning rate blows the residual stream up to inf while the softcapped loss
  stays finite; that must count as non-finite and stop the run, not train a dead model."""
  c = tiny_run_config()
  c.optim.matrix_lr = 1e30
  c.train.max_consecutive_nonfinite = 2
  with pytest.raises(run.NonFiniteError, match="consecutive non-finite updates"):
    run.train_and_evaluate(c, str(tmp_path / "diverged"))


def test_profile_steps_write_a_trace(tmp_path):
  c = tiny_run_config()  # the uninterrupted run's programs: compiled once (conftest's cache)
  c.train.profile_steps = "1,3"
  run.train_and_evaluate(c, str(tmp_path / "profiled"))
  assert list((tmp_path / "profiled" / "profile").rglob("*.xplane.pb"))


def test_eval_at_other_loop_counts(uninterrupted):
  workdir, summary = uninterrupted
  results = run.evaluate_checkpoint(tiny_run_config(), str(workdir), [2, 1, 5])
  assert sorted(results) == [1, 2, 5]
  np.testing.assert_allclose(results[2]["loss"], summary["eval_loss"], rtol=1e-5)
  assert results[1]["loss"] != results[2]["loss"] != results[5]["loss"]
  assert all(0.0 <= r["answer_accuracy"] <= 1.0 for r in results.values())
  assert json.loads((workdir / "eval_step6.json").read_text())["step"] == 6


def test_eval_from_the_workdir_alone_adds_to_the_results(uninterrupted, capsys):
  """No config: the saved one is used; a second sweep of the same step adds its K' to
  the results file; --eval_step picks an older checkpoint; CSV, PNG and TensorBoard."""
  workdir, summary = uninterrupted
  first = run.evaluate_checkpoint(None, str(workdir), [1, 2])
  np.testing.assert_allclose(first[2]["loss"], summary["eval_loss"], rtol=1e-5)
  assert 0.0 <= first[2]["h_change"] < 1.0
  # Another config's K (a K=1 config on this K=2 workdir) does not change the trained K.
  other = tiny_run_config()
  other.model.loops = 1
  run.evaluate_checkpoint(other, str(workdir), [3])
  assert "trained at K=2" in capsys.readouterr().out
  table = json.loads((workdir / "eval_step6.json").read_text())
  assert table["trained_loops"] == 2 and {"2", "3"} <= set(table["loops"])
  assert table["loops"]["1"]["h_change"] is None  # K'=1 has no loop-to-loop change
  rows = (workdir / "loop_sweep_step6.csv").read_text().splitlines()
  assert len(rows) == 1 + len(table["loops"])
  assert (workdir / "loop_sweep_step6.png").stat().st_size > 1000
  assert list((workdir / "tb" / "loop_sweep_step6").glob("events.out.tfevents.*"))
  older = run.evaluate_checkpoint(None, str(workdir), [2], step=3)
  assert older[2]["loss"] != first[2]["loss"]
  assert json.loads((workdir / "eval_step3.json").read_text())["step"] == 3
  assert "model:" in (workdir / "config.txt").read_text()


def test_hop_data_config_holds_only_that_hop_count():
  c = tiny_run_config()
  data = run.hop_data_config(c.data, 2)
  assert (data.multihop.hops_min, data.multihop.hops_max) == (2, 2)
  assert (c.data.multihop.hops_min, c.data.multihop.hops_max) == (1, 2)  # not changed
  pipeline = data_pipeline.make_pipeline(
    data, split="validation", seq_len=c.model.seq_len, batch_size=8, num_epochs=1
  )
  texts = [pipeline.tokenizer.decode(row) for batch in pipeline for row in batch["inputs"]]
  assert len(texts) == 8 and all(" hops 2 ? " in t for t in texts)


def test_multihop_eval_writes_the_hops_by_loops_table(uninterrupted):
  """--mode=eval on multihop data: each hop count alone at each K', as a CSV (a row per
  hop count, a column per K') and a heat-map PNG."""
  workdir, _ = uninterrupted
  results = run.evaluate_checkpoint(None, str(workdir), [1, 3])
  table = sweep_report.read_hop_table(workdir / "hops_by_loops_step6.csv")
  assert sorted(table) == [1, 2]  # data.multihop.hops_min..hops_max of tiny_config
  assert {1, 3} <= set(table[1]) and {1, 3} <= set(table[2])
  for hops, row in table.items():
    for k in (1, 3):
      assert row[k] == results[k][f"answer_accuracy_hops{hops}"]
      assert 0.0 <= row[k] <= 1.0
  assert (workdir / "hops_by_loops_step6.png").stat().st_size > 1000


def test_a_checkpoint_saved_before_a_field_existed_restores(uninterrupted, tmp_path):
  """A saved config without fields added since (here model.unroll_layers and
  train.log_every) restores from the workdir alone, those fields at their defaults."""
  workdir, _ = uninterrupted
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  saved_path = old / "checkpoints" / "6" / "config" / "metadata"
  saved = json.loads(saved_path.read_text())
  del saved["model"]["unroll_layers"], saved["train"]["log_every"]
  saved_path.write_text(json.dumps(saved))
  run_setup, params, step = run.restore_params(str(old))
  _, want, _ = run.restore_params(str(workdir))
  assert step == 6 and run_setup.model_cfg.unroll_layers is False
  assert run_setup.config.train.log_every == presets.get_base_config().train.log_every
  for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_eval_on_an_empty_workdir_creates_nothing(uninterrupted, tmp_path):
  with pytest.raises(ValueError, match="no checkpoints"):
    run.evaluate_checkpoint(None, str(tmp_path / "empty"), [1])
  assert not (tmp_path / "empty").exists()
  workdir, _ = uninterrupted
  with pytest.raises(ValueError, match=r"no checkpoint for step 4 .* available: \[3, 6\]"):
    run.restore_params(str(workdir), None, step=4)


def test_longer_run_on_resume_warns_about_the_schedule(uninterrupted, tmp_path, capsys):
  workdir, _ = uninterrupted
  copy = tmp_path / "longer"
  shutil.copytree(workdir, copy)
  c = tiny_run_config()
  c.train.steps = STEPS + 2
  run.train_and_evaluate(c, str(copy))
  out = capsys.readouterr().out
  assert f"train.steps changed from {STEPS} to {STEPS + 2} on resume" in out
  assert "multiplier goes from 0.000" in out  # the old schedule had warmed down to 0


def _nan_loss(monkeypatch):
  """Every update from now on has a NaN loss (and so is skipped)."""
  real_loss_fn = step_lib.loss_fn
  monkeypatch.setattr(
    step_lib,
    "loss_fn",
    lambda *a, **k: (lambda loss, aux: (loss * float("nan"), aux))(*real_loss_fn(*a, **k)),
  )


def test_nonfinite_updates_stop_the_run_and_keep_the_checkpoint(
  uninterrupted, tmp_path, monkeypatch, capsys
):
  # The uninterrupted run as it stood after step 3: its checkpoint 6 removed.
  workdir = tmp_path / "nan"
  shutil.copytree(uninterrupted[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  before = checkpoint_listing(workdir)
  _nan_loss(monkeypatch)
  c = tiny_run_config()
  # Resumed at step 3; steps 4 and 5 are non-finite, so step 5 trips the rule. Step 5 is
  # not a sync step (log only at the first step, checkpoints every 3): the loop finds
  # the trip at step 6 and still reports step 5, without saving step 6.
  c.train.steps = STEPS
  c.train.max_consecutive_nonfinite = 2
  c.train.log_every = 100
  c.train.eval_every = 0
  with pytest.raises(run.NonFiniteError, match="2 consecutive non-finite updates at step 5;"):
    run.train_and_evaluate(c, str(workdir))
  assert checkpoint_listing(workdir) == before
  out = capsys.readouterr().out
  assert "step 4: 1 non-finite update(s) skipped since the last report (1 in a row" in out
  assert "step 6: 1 non-finite update(s) skipped since the last report (2 in a row" in out
  assert "step 4/6 | loss nan" in out


class DeviceValue:
  """Stands in for a device array that the train step returned: any read on the host
  (int(), float(), bool(), np.asarray, comparisons, formatting) raises, except through
  the loop's `fetch`. (jax.transfer_guard cannot show this on CPU, where device arrays
  already live in host memory and the guard never fires.)"""

  def __init__(self, array):
    self.array = array

  def _read(self, *args, **kwargs):
    raise AssertionError("a device value was read on the host outside the loop's fetch")

  __int__ = __float__ = __bool__ = __index__ = __array__ = __format__ = _read
  __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __add__ = __radd__ = _read
  __hash__ = None

  def __getattr__(self, name):
    return self._read()


def unwrap(tree):
  return jax.tree.map(lambda x: x.array if isinstance(x, DeviceValue) else x, tree)


def test_no_device_reads_between_sync_steps(tmp_path, monkeypatch):
  """Between log, eval and checkpoint steps the loop only dispatches: nothing it does
  reads a device value, so the host never waits for the device there."""
  c = tiny_run_config()
  c.train.update(dict(steps=7, log_every=3, eval_every=0))
  c.checkpoint.every_steps = 5
  steps_read = []
  real_compile, real_fetch, real_save = (
    run.RunSetup.compile_train_step,
    loop.fetch,
    Checkpointer.save,
  )

  class Guarded:
    def __init__(self, compiled):
      self.compiled = compiled

    def __call__(self, state, batch):
      return jax.tree.map(DeviceValue, self.compiled(unwrap(state), batch))

    def __getattr__(self, name):  # memory_analysis() for the fit check
      return getattr(self.compiled, name)

  def compile_train_step(setup, diagnostics=False):
    return Guarded(real_compile(setup, diagnostics))

  def fetch(tree):
    out = real_fetch(unwrap(tree))
    counters = out[0] if isinstance(out, tuple) else out
    steps_read.append(int(counters["applied"] + counters["skipped"]))
    return out

  def save(self, step, state, *args, **kwargs):
    return real_save(self, step, unwrap(state), *args, **kwargs)

  monkeypatch.setattr(run.RunSetup, "compile_train_step", compile_train_step)
  monkeypatch.setattr(loop, "fetch", fetch)
  monkeypatch.setattr(Checkpointer, "save", save)
  summary = run.train_and_evaluate(c, str(tmp_path / "guarded"))
  assert summary["step"] == 7
  # Logs at 1 (first), 3, 6, 7 (last); checkpoints at 5 and 7. Steps 2 and 4: no read.
  assert steps_read == [0, 1, 3, 5, 6, 7]  # 0: the step it starts from
  assert sorted(logged_losses(tmp_path / "guarded")) == [1, 3, 6, 7]
