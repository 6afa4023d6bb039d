"""Tiny runs of the run layer (what `python -m flt_jax.main` drives) and what they leave in
a workdir: configs, the same config as command-line flags, logged losses, checkpoint files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections

from flt_jax import presets

REPO = Path(__file__).resolve().parents[2]
STEPS = 6  # tiny_run_config's run length: checkpoints at 3 and 6, eval at 3 and 6


def tiny_run_config(**model) -> ml_collections.ConfigDict:
  """The cpu preset shrunk to K=2, L=1, d_model 32 on multihop data (hops 1-2): STEPS steps
  of 4 sequences of 24 tokens, logging every step; `model` overrides config.model."""
  c = presets.make("FLT", 2, "cpu")
  c.model.update(dict(n_layer=1, d_model=32, n_head=1, n_kv_head=1, seq_len=24))
  c.model.update(model)
  c.data.update(dict(source="multihop", loss_on_answer_only=False, num_validation_examples=8))
  c.data.multihop.update(dict(num_nodes=4, hops_min=1, hops_max=2))
  c.train.update(
    dict(
      steps=STEPS,
      micro_batch_size=4,
      total_batch_tokens=96,
      log_every=1,
      eval_every=3,
      eval_steps=1,
    )
  )
  c.checkpoint.update(dict(every_steps=3, keep=3))
  # One CPU device, as in the test processes (conftest), so that a subprocess trains bit
  # for bit like them (tests/test_run.py runs the preset's two devices on purpose).
  c.mesh.cpu_devices = 0
  return c


def two_micro_batch_config(steps: int, data: int = 1, fsdp: int = -1):
  """tiny_run_config with two micro-batches of 8 per step on a (data, fsdp) mesh, eval
  every 2 steps and a checkpoint every 2: the run layer on several devices or hosts."""
  c = tiny_run_config()
  c.train.update(dict(steps=steps, micro_batch_size=8, total_batch_tokens=8 * 24 * 2))
  c.train.update(dict(log_every=1, eval_every=2, eval_steps=1))
  c.checkpoint.update(dict(every_steps=2, keep=3))
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=1))
  return c


def config_flags(c: ml_collections.ConfigDict) -> list[str]:
  """tiny_run_config's settings as --config.x.y=v flags for a subprocess."""
  flat = []
  for section in ("model", "data", "train", "checkpoint", "mesh"):
    for k, v in c[section].items():
      if not hasattr(v, "items"):
        flat.append(f"--config.{section}.{k}={v}")
  for k, v in c.data.multihop.items():
    flat.append(f"--config.data.multihop.{k}={v}")
  return flat


def main_command(workdir, *extra: str) -> list[str]:
  """The main command on tiny_run_config (K=2) in workdir, `extra` flags last."""
  return [
    sys.executable,
    "-m",
    "flt_jax.main",
    "--config=experiments/flt_12loop.py",
    f"--workdir={workdir}",
    "--config.model.loops=2",
    *config_flags(tiny_run_config()),
    *extra,
  ]


def logged_losses(workdir) -> dict[int, float]:
  """step -> train loss from metrics.jsonl, the last record of each step winning (a resumed
  run appends)."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "train/loss" in rec:
      out[rec["step"]] = rec["train/loss"]
  return out


def logged_eval_losses(workdir) -> dict[int, float]:
  """step -> eval loss from metrics.jsonl, the last record of each step winning."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "eval/loss" in rec:
      out[rec["step"]] = rec["eval/loss"]
  return out


def checkpoint_listing(workdir) -> list[tuple[str, int, int]]:
  """(path, size, mtime) of every file under WORKDIR/checkpoints: equal listings mean
  nothing saved was touched."""
  root = Path(workdir) / "checkpoints"
  return sorted(
    (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
    for p in root.rglob("*")
    if p.is_file()
  )
