"""Training-step cost of the looped model as K grows: throughput, compile time, memory.

  python benchmarks/model_bench.py [--quick] [--variants=FLT,LT] [--loops=1,6,12]
      [--remat=none,loop] [--n_layer=2] [--d_model=128] [--n_head=1] [--seq_len=256]
      [--batch_size=16] [--vocab_size=256] [--loss_type=END] [--dtype=float32] [--steps=3]

For every (variant, remat, K) it jits value_and_grad(loss_fn) and reports
  compile_s  trace + lower + compile of the gradient function,
  temp_MiB   compiled.memory_analysis().temp_size_in_bytes (peak scratch memory),
  tok/s      forward+backward tokens per second (one warm-up step, then --steps timed),
then the ratios K_max / K_min of compile time (target <= 1.5: nn.scan keeps the program
size independent of K) and of temp memory with loop remat (target <= 2: only the K
loop carries are kept). A row whose compilation fails shows the error instead.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from flt_jax.model.config import ModelConfig, get_config  # pylint: disable=g-import-not-at-top
from flt_jax.model.looped import LoopedTransformer  # pylint: disable=g-import-not-at-top
from flt_jax.model.loss import loss_fn  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--variants", type=csv, default=["FLT", "LT"])
  p.add_argument("--loops", type=lambda s: [int(x) for x in csv(s)], default=[1, 6, 12])
  p.add_argument("--remat", type=csv, default=["none", "loop"])
  p.add_argument("--n_layer", type=int, default=2)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--n_head", type=int, default=1)
  p.add_argument("--n_kv_head", type=int, default=0, help="0 = n_head")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--vocab_size", type=int, default=256)
  p.add_argument("--loss_type", default="END")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3, help="timed steps per row")
  p.add_argument("--quick", action="store_true", help="1 timed step per row")
  return p.parse_args(argv)


def model_config(args, variant, loops, remat):
  c = get_config()
  c.update(
    dict(
      variant=variant,
      loops=loops,
      remat=remat,
      n_layer=args.n_layer,
      d_model=args.d_model,
      n_head=args.n_head,
      n_kv_head=args.n_kv_head or args.n_head,
      seq_len=args.seq_len,
      vocab_size=args.vocab_size,
      loss_type=args.loss_type,
      dtype=args.dtype,
    )
  )
  return ModelConfig.from_config(c)


def bench_row(args, params, inputs, targets, variant, loops, remat):
  model = LoopedTransformer(model_config(args, variant, loops, remat))
  grad_fn = jax.value_and_grad(lambda p, x, y: loss_fn(p, model, x, y)[0])
  t0 = time.perf_counter()
  compiled = jax.jit(grad_fn).lower(params, inputs, targets).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = None if mem is None else mem.temp_size_in_bytes
  jax.block_until_ready(compiled(params, inputs, targets))  # warm-up
  steps = 1 if args.quick else args.steps
  t0 = time.perf_counter()
  for _ in range(steps):
    loss, _ = jax.block_until_ready(compiled(params, inputs, targets))
  step_s = (time.perf_counter() - t0) / steps
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"loss is {float(loss)}")
  return dict(compile_s=compile_s, temp=temp, step_s=step_s, tok_s=inputs.size / step_s)


def _fmt(x, spec):
  return "n/a" if x is None else format(x, spec)


def main(argv=None):
  args = parse_args(argv)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device, "
    f"{os.cpu_count()} cpus); L={args.n_layer} D={args.d_model} H={args.n_head} "
    f"T={args.seq_len} B={args.batch_size} V={args.vocab_size} loss={args.loss_type} "
    f"dtype={args.dtype} steps={1 if args.quick else args.steps}\n"
  )
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(
    rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1)), jnp.int32
  )
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  # params do not depend on the variant, K or remat: initialise once
  init_cfg = model_config(args, args.variants[0], 1, "none")
  params = nn.meta.unbox(
    jax.jit(LoopedTransformer(init_cfg).init)(jax.random.PRNGKey(0), inputs)["params"]
  )

  results = {}
  print("| variant | remat | K | compile s | temp MiB | step s | tokens/s |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for variant in args.variants:
    for remat in args.remat:
      for loops in args.loops:
        try:
          r = bench_row(args, params, inputs, targets, variant, loops, remat)
        except Exception as e:  # pylint: disable=broad-except
          msg = f"{type(e).__name__}: {e}".splitlines()[0][:90]
          print(f"| {variant} | {remat} | {loops} | error: {msg} | | | |", flush=True)
          continue
        results[(variant, remat, loops)] = r
        temp_mib = None if r["temp"] is None else r["temp"] / 2**20
        print(
          f"| {variant} | {remat} | {loops} | {r['compile_s']:.2f} | "
          f"{_fmt(temp_mib, '.1f')} | {r['step_s']:.3f} | {r['tok_s']:,.0f} |",
          flush=True,
        )

  lo, hi = min(args.loops), max(args.loops)
  print(f"\nRatios K={hi} / K={lo} (targets: compile <= 1.5x; temp memory with loop remat <= 2x)")
  print("| variant | remat | compile ratio | temp memory ratio |")
  print("|---|---|---:|---:|")
  for variant in args.variants:
    for remat in args.remat:
      a, b = results.get((variant, remat, lo)), results.get((variant, remat, hi))
      if a is None or b is None:
        print(f"| {variant} | {remat} | n/a | n/a |")
        continue
      c_ratio = b["compile_s"] / a["compile_s"]
      m_ratio = b["temp"] / a["temp"] if a["temp"] and b["temp"] is not None else None
      c_ok = "ok" if c_ratio <= 1.5 else "MISS"
      m_txt = _fmt(m_ratio, ".2f")
      if remat == "loop" and m_ratio is not None:
        m_txt += " ok" if m_ratio <= 2.0 else " MISS"
      print(f"| {variant} | {remat} | {c_ratio:.2f} {c_ok} | {m_txt} |")


if __name__ == "__main__":
  main()
