"""One CPU device against several: the train step alone vs data-parallel, in one process.

  python benchmarks/cpu_devices_bench.py [--devices=2] [--layers=2] [--reps=8]

XLA:CPU runs a batched matmul (attention's) and most elementwise fusions on one thread,
so `config.mesh.cpu_devices` splits the host into XLA CPU devices and the cpu preset
splits the batch over them (`data`). This process starts JAX with --devices CPU devices
and times, alternately, the benchmark case's train step (train_bench.build_case: FLT
K=12, the cpu preset's remat, T=256, B=16 at L=2 / B=8 at L=4) jitted for device 0
alone and jitted with params replicated and the batch split over all devices. It prints
both losses (the same computation) and the median over pairs of one/parallel, the
speed-up; alternating in one process keeps a shared machine's noise out of the ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--loops", type=int, default=12)
  parser.add_argument("--reps", type=int, default=8)
  args = parser.parse_args()

  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)  # before any JAX operation

  from benchmarks import train_bench
  from flt_jax import presets
  from flt_jax.train import step as step_lib

  model, optimizer, state, batch = train_bench.build_case(
    presets, "FLT", args.loops, args.layers, "preset"
  )
  train_step = functools.partial(step_lib.train_step, model=model, optimizer=optimizer, num_micro=1)
  devices = jax.devices()
  replicated, rows = train_bench.data_parallel(devices)
  one = (jax.jit(train_step), *jax.device_put((state, batch), devices[0]))
  parallel = (
    jax.jit(train_step, out_shardings=replicated),
    jax.device_put(state, replicated),
    jax.device_put(batch, rows),
  )

  def seconds(fn, state, batch) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, batch))
    return time.perf_counter() - t0

  loss_one = float(one[0](*one[1:])[1]["loss"])
  loss_parallel = float(parallel[0](*parallel[1:])[1]["loss"])
  # Timed on the same state each call: the step is a pure function of it.
  pairs = [(seconds(*one), seconds(*parallel)) for _ in range(args.reps)]
  t_one = statistics.median(a for a, _ in pairs)
  t_parallel = statistics.median(b for _, b in pairs)
  speedup = statistics.median(a / b for a, b in pairs)
  tokens = batch["inputs"].size
  print(
    f"FLT K={args.loops} L={args.layers} B={batch['inputs'].shape[0]}: loss {loss_one:.6f} on "
    f"one device, {loss_parallel:.6f} on {len(devices)}\n"
    f"one device   {t_one:.3f} s/step  {tokens / t_one:,.0f} tok/s\n"
    f"{len(devices)} devices    {t_parallel:.3f} s/step  {tokens / t_parallel:,.0f} tok/s\n"
    f"speed-up {speedup:.2f}x (median over {args.reps} alternating pairs: "
    f"{', '.join(f'{a / b:.2f}' for a, b in pairs)})"
  )


if __name__ == "__main__":
  main()
