"""Tiny programs and batches shared by the 1-device and 8-device parallel tests."""

from __future__ import annotations

import jax
import numpy as np

from flt_jax import config as flt_config
from flt_jax import run
from flt_jax.constants import IGNORE_LABEL
from flt_jax.parallel import sharding as sharding_lib

SEQ_LEN = 32
GLOBAL_BATCH = 16
MICRO_BATCH = 8  # two micro-batches per step
VOCAB = 100
MODELS = {
  # FLT with grouped-query attention (4 query heads over 2 kv heads), END loss.
  "gqa": dict(kv_lora_rank=0, loss_type="END"),
  # FLT with multi-head latent attention, loss on every loop.
  "mla": dict(kv_lora_rank=16, loss_type="STEP"),
}


def tiny_config(model: str = "gqa", **mesh):
  c = flt_config.default_config()
  c.model.update(
    vocab_size=VOCAB,
    n_layer=2,
    d_model=64,
    n_head=4,
    n_kv_head=2,
    seq_len=SEQ_LEN,
    loops=2,
    window_pattern="SL",
    **MODELS[model],
  )
  c.train.update(steps=10, total_batch_tokens=GLOBAL_BATCH * SEQ_LEN, micro_batch_size=MICRO_BATCH)
  c.optim.muon_momentum_warmup_steps = 3
  # AdamW normalises each entry's gradient, so an embedding entry whose gradient is a
  # near-cancelling sum moves by a sizeable fraction of lr whatever its rounding, and the
  # rounding depends on the order of the cross-device reduction. At the recipe's
  # embedding lr (0.69 at d_model 64) three steps drift apart by up to 5e-5 between
  # meshes; at 1/100 of it by < 3e-6, well inside the 1e-5 the params are compared to,
  # while a sharding mistake in the AdamW groups still moves them by ~lr >> 1e-5.
  c.optim.embedding_lr *= 0.01
  c.optim.unembedding_lr *= 0.01
  c.mesh.update(mesh)
  return c


def program(model: str = "gqa", devices=None, **mesh) -> run.Program:
  """The tiny config's program (run.build_program, as training and flt_jax.aot build it)
  over `devices` (default: all)."""
  return run.build_program(tiny_config(model, **mesh), None, devices)


def host_batches(num: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num):
    tokens = rng.integers(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), dtype=np.int32)
    targets = tokens[:, 1:].copy()
    targets[rng.random(targets.shape) < 0.1] = IGNORE_LABEL  # some positions carry no loss
    batches.append({"inputs": tokens[:, :-1], "targets": targets})
  return batches


class ShardedRun:
  """A program on a mesh: sharded state, compiled step, global batches."""

  def __init__(self, prog: run.Program):
    self.prog = prog
    self.mesh, self.rules = prog.mesh, prog.rules
    self.shardings, self.batch_sharding = prog.state_shardings, prog.batch_sharding
    self.step = prog.train_step()
    self._compiled = None

  def init(self, seed: int = 0):
    return sharding_lib.create_sharded(
      self.prog.init_fn, self.mesh, self.rules, self.shardings, jax.random.PRNGKey(seed)
    )

  def abstract(self):
    """The state as ShapeDtypeStructs with this mesh's shardings (a restore target)."""
    return self.prog.restore_target

  def global_batch(self, host_batch):
    return sharding_lib.make_global_batch(host_batch, self.batch_sharding, GLOBAL_BATCH)

  def compiled(self, state, batch):
    if self._compiled is None:
      self._compiled = self.step.lower(state, batch).compile()
    return self._compiled

  def compiled_text(self) -> str:
    """The compiled step's HLO (after a run compiled it)."""
    assert self._compiled is not None, "run() compiles the step first"
    return self._compiled.as_text()

  def run(self, state, host_batches, after_step=None):
    """Steps through the batches with no host transfer inside a step; returns
    (state, losses)."""
    losses = []
    for i, host_batch in enumerate(host_batches):
      batch = self.global_batch(host_batch)
      compiled = self.compiled(state, batch)
      with jax.transfer_guard("disallow"):
        state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))
      if after_step is not None:
        after_step(i + 1, state)
    return state, losses
