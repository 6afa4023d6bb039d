"""python -m flt_jax.sample on a workdir trained a few steps by the run layer: the streamed
text is the greedy continuation by full recomputation, and the three refusals (no
checkpoint, a checkpoint of another model shape, a request beyond the rotary table)
are one line naming the problem and the fix."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flt_jax import presets, run, sample

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fib("
NEW = 20


def tiny_config():
  c = presets.make("LT_ia", 2, "cpu")  # stdlib text, bytes tokenizer
  c.model.update(
    dict(
      n_layer=2, d_model=32, n_head=2, n_kv_head=1, seq_len=24, window_pattern="SL", remat="none"
    )
  )
  c.train.update(
    dict(steps=2, micro_batch_size=4, total_batch_tokens=96, log_every=100, eval_every=100)
  )
  c.train.eval_steps = 1
  c.checkpoint.update(dict(every_steps=2, keep=1))
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sample_run")
  run.train_and_evaluate(tiny_config(), str(workdir))
  return workdir


def recomputed_greedy_text(workdir, prompt, n):
  run_setup, params, _ = run.restore_params(str(workdir))
  model, tokenizer = run_setup.model, run_setup.tokenizer
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t, 2))
  tokens = [tokenizer.eos_id, *tokenizer.encode(prompt)]
  start = len(tokens)
  for _ in range(n):
    buf = np.zeros([1, 64], np.int32)
    buf[0, : len(tokens)] = tokens
    tokens.append(int(np.argmax(forward(params, buf)[0, len(tokens) - 1])))
  return tokenizer.decode(tokens[start:])


def cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "flt_jax.sample", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_sample_command_streams_the_greedy_continuation(workdir):
  proc = cli(
    f"--workdir={workdir}",
    f"--prompt={PROMPT}",
    f"--max_new_tokens={NEW}",
    "--temperature=0",
    "--stop_token=-1",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = recomputed_greedy_text(workdir, PROMPT, NEW)
  assert proc.stdout == PROMPT + want + "\n"
  assert len(want.encode("utf-8", "replace")) >= NEW // 4  # bytes, some maybe invalid


def test_sampled_text_is_streamed_piece_by_piece(workdir):
  pieces = []
  text = sample.generate_text(
    str(workdir), PROMPT, max_new_tokens=NEW, temperature=1.0, top_k=20, seed=3, write=pieces.append
  )
  assert text and "".join(pieces) == text
  assert len(pieces) > 1  # streamed as it came, not written once at the end


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def test_a_workdir_without_checkpoints_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="no checkpoints in .*train first") as e:
    sample.generate_text(str(tmp_path / "empty"), PROMPT)
  _one_line(e)
  assert not (tmp_path / "empty").exists()
  proc = cli(f"--workdir={tmp_path / 'empty'}", "--prompt=x")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no checkpoints in ") and "train first" in last
  assert proc.stdout == ""


def test_a_checkpoint_of_another_model_shape_is_one_line(workdir, tmp_path):
  copy = tmp_path / "edited"
  shutil.copytree(workdir, copy)
  (config_file,) = (copy / "checkpoints" / "2" / "config").glob("metadata")
  saved = json.loads(config_file.read_text())
  saved["model"]["d_model"] = 64  # the stored params stay 32 wide
  config_file.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="holds params of another model shape") as e:
    sample.generate_text(str(copy), PROMPT, max_new_tokens=4)
  message = _one_line(e)
  assert "stored (2, 32," in message and "config gives (2, 64," in message


def test_a_request_beyond_the_rotary_table_is_one_line(workdir):
  # seq_len 24: a rotary table of 240 positions; eos + 8 prompt bytes + 240 > 240
  with pytest.raises(ValueError, match=r"needs 248 positions, more than the rotary table's 240"):
    sample.generate_text(str(workdir), PROMPT, max_new_tokens=240)
  with pytest.raises(ValueError, match="the prompt is 301 tokens, 61 more than the 240") as e:
    sample.generate_text(str(workdir), "x" * 300, max_new_tokens=1)
  _one_line(e)


def test_exit_and_kv_loops_say_what_the_generation_ran(workdir):
  """Threshold 0 with the exact cache as a ring of K=2 slots: the greedy text, and after
  it (stderr) every token's loops, the block evaluations run and the cache's bytes."""
  proc = cli(
    f"--workdir={workdir}",
    f"--prompt={PROMPT}",
    f"--max_new_tokens={NEW}",
    "--temperature=0",
    "--stop_token=-1",
    "--exit=kl:0",
    "--kv_loops=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == PROMPT + recomputed_greedy_text(workdir, PROMPT, NEW) + "\n"
  loops_line, cache_line = proc.stderr.strip().splitlines()[-2:]
  # 20 steps of 2 loops x 2 layers; the prompt (eos + 8 bytes) but its last token: 2 loops
  assert loops_line == (
    f"loops: K=2, exit kl:0, min_loops 1: mean exit loop 2.00 over {NEW} new token(s); "
    f"block evaluations run: 80 by {NEW} step(s) (40 loop iterations x 2 layers), 4 by the "
    "prompt pass"
  )
  assert cache_line.startswith("cache: ring of 2 slots per layer for 2 loops")
  assert "1.000x the exact cache's" in cache_line


def test_fewer_loop_slots_and_an_exit_rule_are_checked(workdir):
  pieces = []
  sample.generate_text(
    str(workdir),
    PROMPT,
    max_new_tokens=4,
    kv_loops="first",
    exit_rule="latent_diff:0.5",
    min_loops=2,
    log=pieces.append,
  )
  assert "min_loops 2" in pieces[0] and "cache: first (1 slot per layer" in pieces[1]
  assert "0.500x the exact cache's" in pieces[1]  # 1 of K=2 slots
  for kwargs, message in (
    ({"kv_loops": "3"}, "--kv_loops=3 is invalid: give a slot count from 1 to the loop count 2"),
    ({"exit_rule": "kl"}, "--exit=kl is invalid: kl needs a threshold"),
    ({"min_loops": 2}, "--min_loops=2 needs --exit=criterion:threshold"),
    ({"exit_rule": "kl:1e-3", "min_loops": 3}, "max_loops=2 is below min_loops=3"),
  ):
    with pytest.raises(ValueError, match=message) as e:
      sample.generate_text(str(workdir), PROMPT, max_new_tokens=2, **kwargs)
    _one_line(e)
