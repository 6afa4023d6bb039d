"""Attention kernels head to head: forward and forward+backward time and TFLOP/s.

  python benchmarks/attention_bench.py [--seq_lens=1024,4096,8192] [--batch_size=4]
      [--n_head=16] [--n_kv_head=4] [--head_dim=128] [--window=1024] [--dtype=bfloat16]
      [--impls=pallas,xla,splash|cudnn] [--block_q=0] [--block_kv=0] [--steps=10]

Rows: every implementation x sequence length x {full causal, left window}; bfloat16,
GQA 4:1 and head dim 128 by default. Times are medians over --steps calls after one
warm-up; TFLOP/s counts only the visible (query, key) pairs: 4*D flops per pair forward,
10*D forward+backward (two matmuls forward, five backward). `vs fused` is pallas's
forward+backward speed relative to the platform's fused kernel (splash on TPU, cuDNN
on GPU); the target is >= 0.9 at T=4096.

On CPU there is nothing to measure: Pallas runs in its interpreter there, so the script
runs one tiny case (T=256, interpret mode) only to show that the script works, and says
so. Numbers from it say nothing about accelerator speed.
"""

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from flt_jax.model import attention  # pylint: disable=g-import-not-at-top

FUSED = {"tpu": "splash", "gpu": "cudnn", "cpu": None}


def parse_args(argv=None):
  platform = attention.current_platform()
  csv = lambda s: [x for x in s.split(",") if x]
  ints = lambda s: [int(x) for x in csv(s)]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_lens", type=ints, default=[1024, 4096, 8192])
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--n_head", type=int, default=16)
  p.add_argument("--n_kv_head", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--window", type=int, default=1024, help="left window of the windowed rows")
  p.add_argument("--dtype", default="bfloat16")
  default_impls = ["pallas", "xla"] + ([FUSED[platform]] if FUSED.get(platform) else [])
  p.add_argument("--impls", type=csv, default=default_impls)
  p.add_argument("--block_q", type=int, default=0)
  p.add_argument("--block_kv", type=int, default=0)
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args(argv)
  if platform == "cpu":
    print(
      "CPU: no accelerator, so Pallas runs in interpret mode. Running one tiny case "
      "(T=256, batch 1, 4 heads, head dim 128) to exercise the script; its times do not "
      "measure kernel speed."
    )
    args.seq_lens, args.batch_size, args.n_head, args.n_kv_head = [256], 1, 4, 1
    args.window, args.steps, args.block_q, args.block_kv = 64, 2, 128, 128
    args.impls = [i for i in args.impls if i in ("pallas", "xla")]
  return args, platform


def visible_pairs(T: int, window: int) -> int:
  """(query, key) pairs that causal attention with this left window computes."""
  rows = np.arange(1, T + 1)
  return int(np.minimum(rows, window).sum() if window > 0 else rows.sum())


def time_call(fn, *args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(args, impl, T, window):
  dtype = jnp.dtype(args.dtype)
  B, H, Hkv, D = args.batch_size, args.n_head, args.n_kv_head, args.head_dim
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (B, T, H, D), dtype)
  k = jax.random.normal(keys[1], (B, T, Hkv, D), dtype)
  v = jax.random.normal(keys[2], (B, T, Hkv, D), dtype)
  do = jax.random.normal(keys[3], (B, T, H, D), dtype)
  options = attention.KernelOptions(
    block_q=args.block_q, block_kv=args.block_kv, windows=(-1, args.window)
  )
  # The window is traced, as it is inside the model's layer scan.
  attend = lambda q, k, v, w: attention.attend(q, k, v, window_left=w, impl=impl, options=options)

  def fwd_bwd(q, k, v, w):
    out, vjp = jax.vjp(functools.partial(attend, w=w), q, k, v)
    return vjp(do)

  w = jnp.int32(window)
  fwd_s = time_call(jax.jit(attend), q, k, v, w, steps=args.steps)
  both_s = time_call(jax.jit(fwd_bwd), q, k, v, w, steps=args.steps)
  pairs = B * H * visible_pairs(T, window)
  return fwd_s, both_s, 4 * D * pairs / fwd_s / 1e12, 10 * D * pairs / both_s / 1e12


def main(argv=None):
  args, platform = parse_args(argv)
  print(
    f"platform={platform} devices={jax.devices()} B={args.batch_size} H={args.n_head} "
    f"Hkv={args.n_kv_head} D={args.head_dim} dtype={args.dtype}"
  )
  header = f"{'impl':8} {'T':>6} {'window':>7} {'fwd ms':>9} {'fwd TF/s':>9} "
  header += f"{'f+b ms':>9} {'f+b TF/s':>9} {'vs fused':>9}"
  print(header)
  fused = FUSED.get(platform)
  for T in args.seq_lens:
    for window in (-1, args.window):
      results = {}
      for impl in args.impls:
        try:
          results[impl] = bench(args, impl, T, window)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{impl:8} {T:6d} {window:7d} failed: {type(e).__name__}: {str(e)[:200]}")
          continue
      for impl, (fwd_s, both_s, fwd_tf, both_tf) in results.items():
        ratio = ""
        if impl == "pallas" and fused in results:
          ratio = f"{results[fused][1] / both_s:9.2f}"
        print(
          f"{impl:8} {T:6d} {window:7d} {fwd_s * 1e3:9.2f} {fwd_tf:9.3f} "
          f"{both_s * 1e3:9.2f} {both_tf:9.3f} {ratio:>9}"
        )


if __name__ == "__main__":
  main()
