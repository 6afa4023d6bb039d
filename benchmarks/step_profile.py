"""Where the train step's time goes, op by op: a jax.profiler trace of the real jitted
train step, summed per compiled HLO instruction.

  python benchmarks/step_profile.py [--variant=FLT] [--loops=12] [--layers=2]
      [--remat=preset|PLACE[:POLICY]] [--steps=2] [--top=20] [--trace_dir=DIR]

The case is train_bench.py's (cpu preset, L=2: d_model 128, T=256, B=16; L=4: d_model
256, B=8). Prints
  - the step's wall time and the model GFLOP/s it reaches (train.metrics.flops_per_token,
    the figure MFU uses; compiled.cost_analysis() counts a scan's body only once);
  - op time summed by kind (the instruction's name without its number: on CPU
    `ynn_fusion` is a YNNPACK subgraph: dots, reductions and the elementwise ops XLA
    fused with them, sometimes several dots in one; `wrapped_broadcast`
    a buffer fill, `dynamic-update-slice` fusions the scans' stacked residuals, ...);
  - the costliest instructions: calls per step, time per call, shape, and the ops fused
    into them (e.g. `dot x2, multiply x5`).
Op times are summed over the runtime's threads, so on a multi-core CPU they can add up
to more than the wall time when independent ops run at once. Tracing slows the step and
overlapping ops inflate each other's durations, so the table says where to look; decide
a change by timing it untraced. The trace stays in
--trace_dir; TensorBoard's profile plugin (xprof) opens it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.train_bench import build_case  # noqa: E402
from flt_jax import presets  # noqa: E402
from flt_jax.train import metrics  # noqa: E402
from flt_jax.train import step as step_lib  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?\[[^\]]*\][^ ]*|\([^)]*\)) ", re.M)
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="FLT")
  p.add_argument("--loops", type=int, default=12)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--remat", default="preset", help="preset, or PLACE[:POLICY] as train_bench")
  p.add_argument("--steps", type=int, default=2, help="traced steps (after one warm-up)")
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--trace_dir", default="")
  return p.parse_args(argv)


def build_step(variant: str, loops: int, layers: int, remat: str):
  """(jitted train_step, state, batch, tokens and model FLOPs per step): train_bench's case."""
  model, optimizer, state, batch = build_case(presets, variant, loops, layers, remat)
  step = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=optimizer, num_micro=1)
  )
  tokens = batch["inputs"].size
  return step, state, batch, tokens, metrics.flops_per_token(model.cfg) * tokens


def fused_ops(hlo_text: str) -> dict[str, str]:
  """computation name -> its ops counted, e.g. 'dot x2, multiply x5'."""
  out = {}
  for block in re.split(r"\n(?=%?[\w.\-]+ \()", hlo_text):
    header = block.split(" ", 1)[0].lstrip("%")
    ops = collections.Counter(re.findall(r"= \S+ ([a-z][\w\-]*)\(", block))
    for skip in ("parameter", "bitcast", "constant", "get-tuple-element"):
      ops.pop(skip, None)
    out[header] = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.most_common(6))
  return out


def op_times(trace_dir: str, names: set[str]) -> tuple[collections.Counter, collections.Counter]:
  """Summed duration (s) and count of every traced event named like an HLO instruction."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  total, calls = collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          total[event.name] += event.duration_ns * 1e-9
          calls[event.name] += 1
  return total, calls


def main(argv=None) -> None:
  args = parse_args(argv)
  step, state, batch, tokens, flops = build_step(args.variant, args.loops, args.layers, args.remat)
  step = step.lower(state, batch).compile()  # one compilation, for the HLO and the runs
  hlo = step.as_text()
  state, _ = jax.block_until_ready(step(state, batch))
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, _ = jax.block_until_ready(step(state, batch))
  wall = (time.perf_counter() - t0) / args.steps
  jax.profiler.stop_trace()

  shapes = dict(_INSTRUCTION.findall(hlo))
  callee = {}  # fusion instruction -> the computation it calls
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    calls = _CALLS.search(line)
    if m and calls:
      callee[m.group(1)] = calls.group(1)
  contents = fused_ops(hlo)
  total, calls = op_times(trace_dir, set(shapes))
  per_step = {name: t / args.steps for name, t in total.items()}
  summed = sum(per_step.values())

  case = f"{args.variant} K={args.loops} L={args.layers} remat={args.remat}"
  print(f"{case}: {wall:.3f} s/step, {tokens / wall:,.0f} tokens/s")
  print(f"model FLOPs: {flops / 1e9:.1f} GFLOP/step -> {flops / wall / 1e9:.0f} GFLOP/s")
  print(f"op time summed over threads: {summed:.3f} s/step ({summed / wall:.2f}x the wall time)")
  print(f"trace: {trace_dir}\n\nby kind of op                        s/step   share")
  kinds = collections.Counter()
  for name, t in per_step.items():
    kinds[re.sub(r"\.\d+$", "", name)] += t
  for kind, t in kinds.most_common(args.top):
    print(f"  {kind:34s} {t:7.3f}  {t / summed:6.1%}")
  print(f"\ncostliest instructions{'':13s}s/step  calls  ms/call  shape / fused ops")
  for name, t in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
    n = calls[name] / args.steps
    inside = contents.get(callee.get(name, ""), "")
    print(
      f"  {name:32s} {t:7.3f} {n:6.0f} {1e3 * t / n:8.2f}  {shapes[name].split('{')[0][:40]}"
      + (f"  [{inside}]" if inside else "")
    )


if __name__ == "__main__":
  main()
