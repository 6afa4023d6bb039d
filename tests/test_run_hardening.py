"""The run layer's answers to broken resumes and broken inputs: a changed data pipeline,
another tokenizer, damaged checkpoint bytes, a failed asynchronous save, and data
problems found before the first step."""

import shutil
import subprocess
import sys

import pytest

from flt_jax import run
from flt_jax.data import tokenizers as tok_lib
from flt_jax.errors import ConfigError
from flt_jax.train.checkpoint import CorruptCheckpointError
from tests.helpers.runs import (
  REPO,
  checkpoint_listing,
  config_flags,
  logged_losses,
  tiny_run_config,
)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A workdir trained 3 steps (checkpoint 3); tests change a copy of it."""
  workdir = tmp_path_factory.mktemp("three_steps") / "run"
  c = tiny_run_config()
  c.train.steps = 3
  run.train_and_evaluate(c, str(workdir))
  return workdir


def test_a_changed_data_setting_on_resume_is_refused_naming_it(three_steps, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(three_steps, workdir)
  c = tiny_run_config()
  before = checkpoint_listing(workdir)
  c.train.steps = 6
  c.data.shuffle = False
  with pytest.raises(ConfigError) as e:
    run.train_and_evaluate(c, str(workdir))
  msg = str(e.value)
  assert msg.startswith("config.data.shuffle=False is invalid: the checkpoint ")
  assert "--config.data.shuffle=True" in msg and "checkpoint.restore_data=False" in msg
  assert "corrupt" not in msg and "Delete" not in msg and "\n" not in msg
  assert checkpoint_listing(workdir) == before
  # The way out it names: keep the trained state, start the new data stream afresh.
  c.checkpoint.restore_data = False
  assert run.train_and_evaluate(c, str(workdir))["step"] == 6
  assert sorted(logged_losses(workdir)) == list(range(1, 7))


def _text_config(tmp_path, tokenizer_path):
  c = tiny_run_config()
  corpus = tmp_path / "corpus.txt"  # one file: split by lines into train and validation
  corpus.write_text("".join(f"line {i}: {'lorem ipsum dolor ' * (i % 5)}\n" for i in range(60)))
  c.data.update(dict(source="text", path=str(corpus), tokenizer="file"))
  c.data.tokenizer_path = str(tokenizer_path)
  c.train.steps = 2
  return c


def test_another_tokenizer_of_the_same_size_is_refused_on_resume(tmp_path):
  texts = [f"def f_{i}(a):\n    return a * {i}\n" * 3 for i in range(100)]
  tok_lib.train_bpe(texts, 300).save(str(tmp_path / "a.json"))
  tok_lib.train_bpe([t.upper() for t in texts], 300).save(str(tmp_path / "b.json"))
  workdir = tmp_path / "run"
  c = _text_config(tmp_path, tmp_path / "a.json")
  summary = run.train_and_evaluate(c, str(workdir))
  assert summary["step"] == 2 and "eval_loss" in summary  # the lone file's tail evaluated
  before = checkpoint_listing(workdir)
  # The same path, now another tokenizer.json of the same vocabulary size.
  (tmp_path / "a.json").write_bytes((tmp_path / "b.json").read_bytes())
  with pytest.raises(ValueError, match="was trained with another tokenizer") as e:
    run.train_and_evaluate(_text_config(tmp_path, tmp_path / "a.json"), str(workdir))
  assert "vocab 300" in str(e.value) and "\n" not in str(e.value)
  assert checkpoint_listing(workdir) == before


def test_damaged_checkpoint_bytes_are_refused_on_restore(three_steps, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(three_steps, workdir)
  step_dir = workdir / "checkpoints" / "3"
  files = sorted(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  data = bytearray(files[-1].read_bytes())
  data[len(data) // 2] ^= 0x01
  files[-1].write_bytes(bytes(data))
  with pytest.raises(CorruptCheckpointError) as e:
    run.restore_params(str(workdir))
  msg = str(e.value)
  assert f"The checkpoint {step_dir} is corrupt" in msg and f"rm -r {step_dir}" in msg
  assert "only checkpoint" in msg


def test_data_problems_are_found_before_anything_is_written(tmp_path):
  no_validation = tiny_run_config()
  no_validation.data.update(dict(source="stdlib", validation_fraction=0.0))
  with pytest.raises(
    ConfigError, match=r"config.data.validation_fraction=0.0 is invalid.*eval_every"
  ):
    run.train_and_evaluate(no_validation, str(tmp_path / "a"))
  one_line = tmp_path / "one.txt"
  one_line.write_text("just one line")
  lone = tiny_run_config()
  lone.data.update(dict(source="text", path=str(one_line)))
  with pytest.raises(ConfigError, match="single document of one line"):
    run.train_and_evaluate(lone, str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  # The fix the message gives trains.
  lone.data.validation_fraction = 0.0
  lone.train.update(dict(eval_every=0, steps=2))
  assert run.train_and_evaluate(lone, str(tmp_path / "b"))["step"] == 2


_FAILING_SAVE = """
import errno, sys
from orbax.checkpoint._src.serialization import serialization
from flt_jax.train import checkpoint as c

async def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")

real_save = c.Checkpointer.save
def save(self, step, *args, **kwargs):
  if int(step) == 3:  # this save's background write fails, as on a full disk
    serialization.async_serialize_from_host = no_space
  return real_save(self, step, *args, **kwargs)
c.Checkpointer.save = save

from absl import app
from flt_jax import main
sys.argv = ["main"] + sys.argv[1:]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_a_failed_async_save_stops_the_run_with_one_message(tmp_path):
  workdir = tmp_path / "run"
  c = tiny_run_config()
  cmd = [sys.executable, "-c", _FAILING_SAVE, "--config=experiments/flt_12loop.py"]
  cmd += [f"--workdir={workdir}", "--config.model.loops=2", *config_flags(c)]
  cmd += ["--config.train.eval_every=0", "--config.train.log_every=100"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out[-3000:]
  directory = workdir / "checkpoints"
  assert errors[0].startswith(
    f"error: Saving the checkpoint for step 3 to {directory} failed: OSError: [Errno 28] "
    "No space left on device."
  )
  assert "free of" in errors[0] and "(shutil.disk_usage)" in errors[0]
  assert "Traceback" not in out and len(out.splitlines()) < 15, out[-3000:]
  # It stopped before the next save: nothing was written as step 6.
  assert not [p for p in directory.iterdir() if p.name.startswith("6")]
