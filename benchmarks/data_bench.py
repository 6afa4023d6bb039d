"""Tokens/s delivered by the data pipelines on this machine.

  python benchmarks/data_bench.py [--seq_len=256] [--batch_size=16] [--seconds=3]

Prints, per pipeline, the build time (first batch included) and the steady
tokens/s (inputs tokens, padding included). Compare with the tokens/s the
train step consumes (seq_len * batch * steps/s): it should be >= 10x lower.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flt_jax.data import config as config_lib  # pylint: disable=g-import-not-at-top
from flt_jax.data import pipeline as pl  # pylint: disable=g-import-not-at-top


def bench(name, d, seq_len, batch_size, seconds):
  t0 = time.perf_counter()
  it = iter(pl.make_pipeline(d, split="train", seq_len=seq_len, batch_size=batch_size))
  next(it)
  build = time.perf_counter() - t0
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += b["inputs"].size
  rate = n / (time.perf_counter() - t0)
  print(
    f"{name:28s} build+first batch {build:6.2f}s   "
    f"{rate / 1e6:8.2f} M tokens/s   ({rate / (seq_len * batch_size):8.0f}"
    " batches/s)",
    flush=True,
  )
  return rate


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--skip_bpe", action="store_true")
  a = p.parse_args()
  print(f"seq_len={a.seq_len} batch_size={a.batch_size} cpus={os.cpu_count()}")
  d = config_lib.get_config()
  bench("default (stdlib, bytes)", d, a.seq_len, a.batch_size, a.seconds)
  for src in ("multihop", "modarith"):
    d = config_lib.get_config()
    d.source = src
    bench(f"{src} (synthetic)", d, a.seq_len, a.batch_size, a.seconds)
  if not a.skip_bpe:
    d = config_lib.get_config()
    d.tokenizer = "bpe"
    bench(f"stdlib, bpe {d.bpe_vocab_size} (trains)", d, a.seq_len, a.batch_size, a.seconds)


if __name__ == "__main__":
  main()
