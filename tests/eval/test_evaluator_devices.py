"""The evaluator on four simulated CPU devices (data=1 fsdp=2 tensor=2: params split over
fsdp and tensor, rows over fsdp) gives the metrics, h_change and scores of a plain
float64 numpy reference on one device. The device count is fixed when JAX starts, so the
sharded side runs in a child process (this file run as a script, XLA_FLAGS set before
it starts)."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from flt_jax.eval.evaluator import Evaluator
from flt_jax.model.looped import LoopedTransformer
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import sharding as sharding_lib
from flt_jax.train import state as state_lib
from tests.helpers.models import model_config, random_params
from tests.helpers.xla_flags import with_fast_compile

ROWS, LENGTH, LOOPS, VOCAB, MAX_LEN = 4, 8, 2, 64, 8
REPO = pathlib.Path(__file__).resolve().parents[2]


def _model_and_params():
  shape = dict(n_layer=2, d_model=32, n_head=2, n_kv_head=2, vocab_size=VOCAB, seq_len=16)
  cfg = model_config(**shape, loops=LOOPS, window_pattern="L", kv_lora_rank=0)
  model = LoopedTransformer(cfg)
  params = random_params(cfg)
  return model, params


def _batch():
  tokens = np.random.default_rng(1).integers(0, VOCAB, (ROWS, LENGTH + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[2, 5:] = -1  # IGNORE_LABEL: padding
  return {"inputs": tokens[:, :-1], "targets": targets}


def _pairs():
  rng = np.random.default_rng(2)
  return [
    (rng.integers(0, VOCAB, n).tolist(), rng.integers(0, VOCAB, m).tolist())
    for n, m in ((3, 2), (5, 3), (1, 1), (12, 2), (4, 4))  # (12, 2): context truncated
  ]


def _sharded() -> dict:
  """The child: metrics and scores from the Evaluator over the four-device mesh."""
  assert jax.device_count() == 4
  model, params = _model_and_params()
  mesh_config = parallel_config.get_config()
  mesh_config.update(data=1, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(mesh_config)
  rules = sharding_lib.logical_rules(mesh_config)
  shardings = sharding_lib.state_shardings(
    state_lib.abstract_params(model, jax.random.key(0), 8), mesh, rules
  )
  params = jax.device_put(params, shardings)
  evaluator = Evaluator(model, mesh, rules, shardings, rows=ROWS, token_bytes_V=np.ones(VOCAB))
  metrics = evaluator.metrics(params, [_batch()], LOOPS, per_loop=True)
  scores = evaluator.score_fn(params, LOOPS, MAX_LEN, rows=2, min_bucket=MAX_LEN)(_pairs())
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  held = sharding_lib.bytes_per_device(params)
  return {"metrics": metrics, "scores": scores, "held_share": max(held.values()) / total}


def test_four_devices_match_a_plain_reference():
  env = dict(
    os.environ,
    XLA_FLAGS=with_fast_compile(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ),
  )
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["held_share"] < 0.5  # the params were split, not copied to every device

  model, params = _model_and_params()

  @functools.partial(jax.jit, static_argnums=1)
  def forward_fn(tokens, loops):
    h, _ = model.apply({"params": params}, tokens, loops, method=model.hidden_states)
    return h, model.apply({"params": params}, h, method=model.logits)

  def forward(tokens, loops):
    return tuple(np.asarray(x, np.float64) for x in forward_fn(tokens, loops))

  def logprobs(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

  batch = _batch()
  h, logits = forward(batch["inputs"], LOOPS)
  h_before, _ = forward(batch["inputs"], LOOPS - 1)
  valid = batch["targets"] >= 0
  picked = np.take_along_axis(logprobs(logits), np.maximum(batch["targets"], 0)[..., None], -1)
  nll = -picked[..., 0][valid].sum()
  relative = np.linalg.norm(h - h_before, axis=-1) / np.linalg.norm(h_before, axis=-1)
  metrics = got["metrics"]
  assert metrics["tokens"] == valid.sum() == ROWS * LENGTH - 3
  assert math.isclose(metrics["loss"], nll / valid.sum(), rel_tol=1e-5)
  assert math.isclose(metrics["bpb"], nll / valid.sum() / math.log(2), rel_tol=1e-5)
  assert math.isclose(metrics["h_change"], relative[valid].mean(), rel_tol=1e-4)

  for (context, continuation), (logprob, greedy) in zip(_pairs(), got["scores"]):
    sequence = (context + continuation)[-(MAX_LEN + 1) :]
    _, logits = forward(np.asarray([sequence[:-1]], np.int32), LOOPS)
    n = len(continuation)
    rows, targets = np.arange(len(sequence) - 1)[-n:], np.asarray(sequence[1:])[-n:]
    assert math.isclose(logprob, logprobs(logits[0])[rows, targets].sum(), abs_tol=1e-4)
    assert greedy == bool(np.all(logits[0][rows].argmax(-1) == targets))


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  print(json.dumps(_sharded()))
