"""Per-token exit and the loop-slot budget on a trained checkpoint, measured three ways.

  python benchmarks/exit_study.py --workdir=/tmp/runs/flt12_multihop \
      --exit=latent_diff:0.15 [--min_loops=1] [--batch=128] [--kv_loops=12,4,first]

1. teacher-forced: the sharded evaluator's exit pass on the validation data (per hop
   count on multihop): accuracy, mean exit loop over answer tokens, executed loops.
2. generation: every validation example's prompt (up to its answer) generated greedily
   with the exit rule, one token per answer, at batch 1 (each example alone) and at
   --batch (examples side by side). It counts the loop iterations the decoding steps
   ran (Generation.step_loops; block evaluations = that x n_layer): at batch 1 each is
   the answer token's own exit loop, in a batch a step runs its slowest row's.
3. the cache budget: each --kv_loops setting decodes the validation rows token by token
   (Generator.teacher_forced): loss and perplexity over the target tokens, answer
   accuracy, the cache's bytes against the exact cache's.

Answer tokens come from the task's answer mask (synthetic data); without one (text),
parts 1 and 3 report the target tokens and part 2 is skipped.
"""

import argparse
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flt_jax  # noqa: F401  pylint: disable=g-import-not-at-top  (before jax: a quiet start)

# isort: split
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from flt_jax import run  # pylint: disable=g-import-not-at-top
from flt_jax.constants import IGNORE_LABEL, PAD_SEGMENT  # pylint: disable=g-import-not-at-top
from flt_jax.eval.generate import Generator  # pylint: disable=g-import-not-at-top
from flt_jax.model import decode  # pylint: disable=g-import-not-at-top
from flt_jax.model import exit as exit_lib  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--exit", required=True, help="criterion:threshold, e.g. latent_diff:0.15")
  p.add_argument("--min_loops", type=int, default=1)
  p.add_argument("--batch", type=int, default=128, help="examples side by side in part 2")
  p.add_argument("--kv_loops", default="", help="comma list of N or first (part 3); '' skips")
  p.add_argument("--max_rows", type=int, default=0, help="validation rows per set (0: all)")
  return p.parse_args(argv)


def validation_sets(restored):
  """{name: [host batches]}: the validation data, and on multihop each hop count's."""
  run_setup = restored.run_setup
  sets = {"all": list(run_setup.eval_batches())}
  if run_setup.config.data.source == "multihop":
    m = run_setup.config.data.multihop
    for hops in range(int(m.hops_min), int(m.hops_max) + 1):
      data = run.hop_data_config(run_setup.config.data, hops)
      sets[f"{hops} hop{'s' if hops > 1 else ''}"] = list(run_setup.eval_batches(data))
  return sets


def rows_of(batches, max_rows):
  """The real rows (not padding) of host batches, each as {inputs, targets, answer}."""
  out = []
  for batch in batches:
    for b in range(batch["inputs"].shape[0]):
      if (batch["segment_ids"][b] == PAD_SEGMENT).all():
        continue
      answer = batch["answer_mask"][b] > 0 if "answer_mask" in batch else None
      out.append({"inputs": batch["inputs"][b], "targets": batch["targets"][b], "answer": answer})
  return out[:max_rows] if max_rows else out


def teacher_forced(restored, sets, rule):
  print(f"1. teacher-forced exit pass, {rule.label} (min_loops {rule.min_loops}):")
  evaluator = restored.run_setup.evaluator
  for name, batches in sets.items():
    m = evaluator.exit_metrics(restored.params, batches, rule)
    quality = (
      f"accuracy {m['answer_accuracy']:.4f}" if "answer_accuracy" in m else f"loss {m['loss']:.4f}"
    )
    compute = m.get("mean_exit_loop_answers", m["mean_exit_loop"])
    print(
      f"  {name:>7}: {quality} | mean exit loop {compute:.3f} per "
      f"{'answer' if 'mean_exit_loop_answers' in m else 'target'} token, "
      f"{m['mean_exit_loop_inputs']:.3f} per input token | executed loops "
      f"{m['executed_loops']:.2f} per batch of {evaluator.rows}"
    )


def reduced_hops(tokenizer, prompt):
  """A multihop prompt's hops k reduced modulo the cycle length of its query node x:
  f^k(x) = f^r(x), so r pointer lookups (0: the answer is x itself) settle it."""
  words = tokenizer.decode(prompt).split()
  bar = words.index("|")
  table = {int(words[i]): int(words[i + 2]) for i in range(0, bar, 4)}
  x, k = int(words[bar + 1]), int(words[bar + 3])
  cycle, y = 1, table[x]
  while y != x:
    y, cycle = table[y], cycle + 1
  return k % cycle


def generation(restored, sets, rule, batch, max_rows):
  run_setup, params = restored.run_setup, restored.params
  model_cfg = run_setup.model_cfg
  print(f"2. generation of each answer token, {rule.label}, greedy:")
  generator = Generator(model_cfg, loops=rule.max_loops, exit_rule=rule)
  by_reduced = {}
  for name, batches in sets.items():
    rows = [r for r in rows_of(batches, max_rows) if r["answer"] is not None and r["answer"].any()]
    if not rows:
      print("  (no answer tokens: skipped)")
      return
    # the answer's first token: generated from the prompt up to its input position
    by_length = {}
    for r in rows:
      p = int(np.argmax(r["answer"]))
      by_length.setdefault(p + 1, []).append((r["inputs"][: p + 1], int(r["targets"][p])))
    for size in (1, batch):
      correct = step_loops = steps = examples = 0
      exits = []
      start = time.time()
      for examples_of_length in by_length.values():
        for i in range(0, len(examples_of_length), size):
          chunk = examples_of_length[i : i + size]
          out = generator.generate(params, np.stack([c[0] for c in chunk]), 1)
          correct += sum(row[0] == c[1] for row, c in zip(out.rows, chunk))
          step_loops, steps = step_loops + out.step_loops, steps + out.steps
          exits += [row[0] for row in out.exit_loops]
          examples += len(chunk)
          if size == 1 and name == "all" and run_setup.config.data.source == "multihop":
            r = reduced_hops(run_setup.tokenizer, chunk[0][0])
            by_reduced.setdefault(r, []).append(
              (out.exit_loops[0][0], out.rows[0][0] == chunk[0][1])
            )
      print(
        f"  {name:>7}, batch {size:>3}: accuracy {correct / examples:.4f} | mean exit loop "
        f"{np.mean(exits):.3f} | {steps} steps ran {step_loops} loop iterations "
        f"({step_loops / steps:.3f} per step; {step_loops * model_cfg.n_layer:,} block "
        f"evaluations) | {time.time() - start:.1f} s"
      )
  if by_reduced:
    print("  by the lookups the answer needs (hops mod the query node's cycle length), batch 1:")
    for r, seen in sorted(by_reduced.items()):
      loops_run, right = zip(*seen)
      print(
        f"    {r} lookup(s): {len(seen):>4} answers | mean exit loop {np.mean(loops_run):.3f} | "
        f"accuracy {np.mean(right):.4f}"
      )


def cache_budget(restored, sets, settings, loops, max_rows):
  model_cfg, params = restored.run_setup.model_cfg, restored.params
  print(f"3. cache budget, token-by-token decoding at K={loops} (no exit):")
  rows = rows_of(sets["all"], max_rows)
  inputs = np.stack([r["inputs"] for r in rows])
  targets = np.stack([r["targets"] for r in rows])
  answers = None if rows[0]["answer"] is None else np.stack([r["answer"] for r in rows])
  exact_bytes = None
  for setting in settings:
    slots = decode.parse_kv_loops(setting, loops)
    generator = Generator(model_cfg, loops=loops, kv_loops=slots)
    logits = np.concatenate(
      [
        generator.teacher_forced(params, inputs[i : i + 128]).logits_BxTxV
        for i in range(0, len(rows), 128)
      ]
    ).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = targets != IGNORE_LABEL
    picked = np.take_along_axis(logprobs, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    loss = -picked[valid].mean()
    line = f"  kv_loops={setting:>5}: loss {loss:.6f} | perplexity {math.exp(loss):.6f}"
    if answers is not None:
      right = (logits.argmax(-1) == targets) | ~(answers & valid)
      line += f" | answer accuracy {right.all(-1)[answers.any(-1)].mean():.4f}"
    length = model_cfg.seq_len
    used = generator.cache_bytes(1, length)
    exact_bytes = exact_bytes or Generator(model_cfg, loops=loops).cache_bytes(1, length)
    line += f" | cache {used:,} bytes per row of {length} = {used / exact_bytes:.3f}x exact"
    print(line + f" | {slots.describe(loops)}")


def main(argv=None):
  args = parse_args(argv)
  restored = run.restore_checkpoint(args.workdir)
  loops = restored.trained_loops
  rule = exit_lib.parse_exit(args.exit, min_loops=args.min_loops, max_loops=loops)
  cfg = restored.run_setup.model_cfg
  print(
    f"{args.workdir} step {restored.step}: {cfg.variant} K={loops} L={cfg.n_layer} "
    f"d={cfg.d_model} | jax {jax.__version__} | {platform.machine()}, "
    f"{os.cpu_count()} CPU(s), {jax.device_count()} {jax.devices()[0].platform} device(s)"
  )
  sets = validation_sets(restored)
  if args.max_rows:  # fewer rows: whole batches of the evaluator's size
    keep = max(1, args.max_rows // restored.run_setup.evaluator.rows)
    sets = {name: batches[:keep] for name, batches in sets.items()}
  teacher_forced(restored, sets, rule)
  generation(restored, sets, rule, args.batch, args.max_rows)
  settings = [s for s in args.kv_loops.split(",") if s]
  if settings:
    cache_budget(restored, sets, settings, loops, args.max_rows)


if __name__ == "__main__":
  main()
