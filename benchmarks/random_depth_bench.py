"""Memory (and optionally time) of the train step with random loop counts and a gradient
window (config.model.loop_sampling / backprop_loops, model/windowed.py).

  python benchmarks/random_depth_bench.py [--layers=2] [--remat=none,block,loop]
      [--window=4] [--count=24] [--time]

The case is the cpu preset's shape (FLT, d_model 128, one head, T=128, B=8, Muon +
AdamW): the whole jitted train step, compiled for this machine. For each remat place it
prints the compiled step's temporary memory (`memory_analysis().temp_size_in_bytes`,
buffers XLA allocates beyond the arguments and outputs) for
  fixed K=window        the plain scan of `window` loops
  random, window k      uniform counts 1..count, gradient through the last k: one
                        compiled step for every count, whose memory is the figure at
                        any count, `count` included
  fixed K=count, k      loop_sampling=fixed at K=count with backprop_loops=k
  fixed K=count         every loop with gradient
and the ratios to the first. With --time, the mean step time of each at K=count (the
random step at the count 24 forced by its state; compile excluded), three steps each.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flt_jax import presets  # noqa: E402
from flt_jax.model import config as model_config  # noqa: E402
from flt_jax.model import loop_count  # noqa: E402
from flt_jax.model.looped import LoopedTransformer  # noqa: E402
from flt_jax.train import optimizer as optim_lib  # noqa: E402
from flt_jax.train import state as state_lib  # noqa: E402
from flt_jax.train import step as step_lib  # noqa: E402

SEQ, BATCH, VOCAB = 128, 8, 256


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--remat", default="none,block,loop")
  p.add_argument("--window", type=int, default=4)
  p.add_argument("--count", type=int, default=24)
  p.add_argument("--time", action="store_true")
  return p.parse_args(argv)


def build(layers: int, remat: str, **model):
  """(jitted train step, state, batch) of one case."""
  config = presets.make("FLT", model.get("loops", 4), "cpu")
  config.model.update(presets.shape_for(layers))
  config.model.update(dict(seq_len=SEQ, vocab_size=VOCAB, remat=remat, **model))
  cfg = model_config.ModelConfig.from_config(config.model)
  net = LoopedTransformer(cfg)
  optimizer = optim_lib.make_optimizer(config.optim, d_model=cfg.d_model, total_steps=1000)
  state = state_lib.create_train_state(net, optimizer, jax.random.PRNGKey(0), SEQ)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = jax.jit(functools.partial(step_lib.train_step, model=net, optimizer=optimizer))
  return step, state, batch, cfg


def step_index_drawing(cfg, count: int) -> int:
  """A step index whose draw (seed 0) is `count`."""
  counts = loop_count.draws_on_host(cfg, 0, range(10_000))
  return int(np.flatnonzero(counts == count)[0])


def main(argv=None):
  args = parse_args(argv)
  k, n = args.window, args.count
  cases = {
    f"fixed K={k}": dict(loops=k),
    f"random 1..{n}, window {k}": dict(
      loops=k, loop_sampling="uniform", max_loops=n, backprop_loops=k
    ),
    f"fixed K={n}, window {k}": dict(loops=n, backprop_loops=k),
    f"fixed K={n}": dict(loops=n),
  }
  print(f"FLT L={args.layers} d={64 * args.layers} T={SEQ} B={BATCH}, {jax.devices()[0].platform}")
  for remat in args.remat.split(","):
    base = None
    for name, model in cases.items():
      step, state, batch, cfg = build(args.layers, remat, **model)
      compiled = step.lower(state, batch).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      base = base or temp
      line = f"remat={remat:5s} {name:26s} temp {temp / 2**20:8.2f} MiB  x{temp / base:5.2f}"
      if args.time:
        if cfg.loop_sampling != "fixed":
          state = state.replace(step=jnp.int32(step_index_drawing(cfg, n)))
        _, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(3):
          _, metrics = compiled(state, batch)
          jax.block_until_ready(metrics)
        ran = int(metrics.get("loops", cfg.loops))
        line += f"  {1e3 * (time.perf_counter() - t0) / 3:8.1f} ms/step at {ran} loops"
      print(line, flush=True)


if __name__ == "__main__":
  main()
