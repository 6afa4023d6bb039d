"""A tiny run config with two micro-batches per step, for the run layer on a mesh."""

from tests.test_run import tiny_config


def config(steps: int, data: int = 1, fsdp: int = -1):
  c = tiny_config()
  c.train.update(dict(steps=steps, micro_batch_size=8, total_batch_tokens=8 * 24 * 2))
  c.train.update(dict(log_every=1, eval_every=2, eval_steps=1))
  c.checkpoint.update(dict(every_steps=2, keep=3))
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=1))
  return c
