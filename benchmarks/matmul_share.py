"""The train step against its own matmuls: how long the step's matrix products take when
each is timed alone, next to the step as it runs.

  python benchmarks/matmul_share.py [--layers=2,4] [--remats=none,preset] [--rounds=2]
      [--reps=3]

Cases are train_bench.py's FLT K=12 shapes (L=2: d_model 128, T=256, B=16; L=4: d_model
256, B=8). For each case and remat setting the matrix products of jit(loss_fn) (forward)
and jit(value_and_grad(loss_fn)) are read off their jaxprs: every dot_general, a scan
body's once per iteration, custom-VJP backward passes and rematerialised recomputation
included. Each distinct product (shapes and dimension numbers) is timed alone at its
per-device shape on all the cpu preset's CPU devices at once (shard_map, no
communication), as the data-parallel step runs it, and the step's products are summed:
  mm fwd / mm grad   the forward's / value-and-grad's products, each at the speed it
                     reaches alone (inputs hot in cache, no elementwise work);
  fwd / grad / step  the real jitted functions (train_bench.py's worker, same sitting);
  real/mm            real time over the products' time alone.
real/mm near 1 means the function runs at the speed of its matmuls, so only fewer or
faster products make it faster; above 1 is time spent outside them. It is not a bound:
in the step XLA merges products that share an operand and fuses elementwise work into
them, so a function can take less than its products alone (real/mm < 1).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_bench  # noqa: E402
from flt_jax import aot  # noqa: E402

VARIANT, LOOPS = "FLT", 12


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--layers", type=lambda s: [int(x) for x in csv(s)], default=[2, 4])
  p.add_argument(
    "--remats", type=csv, default=["none", "preset"], help="preset or PLACE[:POLICY] (; for ,)"
  )
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement")
  return p.parse_args(argv)


def time_products(keys, devices, reps: int, calls: int = 10) -> dict:
  """Seconds per call of each product alone, run on every device at once (min over reps)."""
  import jax
  import jax.numpy as jnp

  mesh = jax.sharding.Mesh(devices, ("data",))
  spec = jax.sharding.PartitionSpec("data")
  out = {}
  for key in keys:
    lhs_shape, rhs_shape, numbers = key

    def local(a, b, numbers=numbers):
      return jax.lax.dot_general(a[0], b[0], numbers)[None]

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    n = len(devices)
    ka, kb = jax.random.split(jax.random.PRNGKey(len(out)))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    a = jax.device_put(jax.random.normal(ka, (n, *lhs_shape), jnp.float32), sharding)
    b = jax.device_put(jax.random.normal(kb, (n, *rhs_shape), jnp.float32), sharding)
    jax.block_until_ready([fn(a, b) for _ in range(2)])
    best = math.inf
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready([fn(a, b) for _ in range(calls)])  # dispatch pipelined
      best = min(best, (time.perf_counter() - t0) / calls)
    out[key] = best
  return out


def count_case(presets, layers: int, remat: str, devices):
  """{fwd, grad}: per-device product counts of the case, and the global GFLOP of each."""
  import jax

  from flt_jax.model.loss import loss_fn

  model, _, state, batch = train_bench.build_case(presets, VARIANT, LOOPS, layers, remat)
  rows = batch["inputs"].shape[0] // len(devices)  # each device's share of the batch
  x, y = batch["inputs"][:rows], batch["targets"][:rows]
  loss = lambda p: loss_fn(p, model, x, y)[0]
  counted = {}
  for part, fn in (("fwd", loss), ("grad", jax.value_and_grad(loss))):
    counts = aot.jaxpr_matmuls(jax.make_jaxpr(fn)(state.params).jaxpr)
    gflop = len(devices) * sum(aot.matmul_flops(k) * n for k, n in counts.items()) / 1e9
    counted[part] = (counts, gflop)
  return counted


def main(argv=None) -> None:
  args = parse_args(argv)
  remats = [r.replace(";", ",") for r in args.remats]
  presets = train_bench._tree_presets(train_bench.REPO)
  devices = train_bench.preset_cpu_devices(presets)
  cases = [dict(variant=VARIANT, loops=LOOPS, layers=layers) for layers in args.layers]
  counted = {}
  for layers in args.layers:
    for remat in remats:
      counted[layers, remat] = count_case(presets, layers, remat, devices)
  keys = sorted({k for c in counted.values() for part in c.values() for k in part[0]})
  print(
    f"{len(keys)} distinct products on {len(devices)} CPU device(s); remats {remats}; "
    f"rounds={args.rounds}, reps={args.reps}",
    flush=True,
  )

  workers = {r: train_bench.Worker(train_bench.REPO, cases, r, args.reps) for r in remats}
  product_s = collections.defaultdict(list)
  real = collections.defaultdict(list)
  try:
    for w in workers.values():
      w.wait_ready()
    for r in range(args.rounds):
      for key, s in time_products(keys, devices, args.reps).items():
        product_s[key].append(s)
      for remat, w in workers.items():
        for i, case in enumerate(cases):
          real[case["layers"], remat].append(w.measure(i))
      print(f"round {r + 1}/{args.rounds} done", flush=True)
  finally:
    for w in workers.values():
      w.close()

  median_s = {key: statistics.median(v) for key, v in product_s.items()}
  print(
    "\ncase           remat        products  GFLOP  mm GFLOP/s  mm fwd s  mm grad s"
    "   fwd s  grad s  step s  real/mm fwd  real/mm grad  grad/fwd: FLOPs  mm  real"
  )
  for (layers, remat), counted_parts in counted.items():
    mm = {
      part: sum(median_s[k] * n for k, n in counts.items())
      for part, (counts, _) in counted_parts.items()
    }
    rows = real[layers, remat]
    fwd, grad, step = (statistics.median(row[k] for row in rows) for k in ("fwd", "grad", "step"))
    products = sum(counted_parts["grad"][0].values())
    gflop_fwd, gflop = counted_parts["fwd"][1], counted_parts["grad"][1]
    print(
      f"FLT K={LOOPS} L={layers}  {remat:12s} {products:8d} {gflop:6.1f} {gflop / mm['grad']:11.1f}"
      f" {mm['fwd']:9.3f} {mm['grad']:10.3f} {fwd:7.3f} {grad:7.3f} {step:7.3f}"
      f" {fwd / mm['fwd']:12.2f} {grad / mm['grad']:13.2f} {gflop / gflop_fwd:16.2f}"
      f" {mm['grad'] / mm['fwd']:4.2f} {grad / fwd:5.2f}"
    )


if __name__ == "__main__":
  main()
