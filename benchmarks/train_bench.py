"""Training speed: the real train step, its split, and the main command's tokens/s.

  python benchmarks/train_bench.py [--quick] [--baseline=<git ref>] [--rounds=3]
      [--variants=FLT,LT] [--loops=1,12] [--layers=2,4] [--remat=preset|PLACE[:POLICY]]
      [--base_remat=preset|PLACE[:POLICY]] [--tree=NAME=PATH]
      [--compare_remat=none,loop,block:attn_out]
      [--main_steps=30] [--no_main] [--main_cases=FLT:12:2,FLT:12:4]

Shapes: L=2 is the cpu preset's model (d_model 128, one head) at T=256, B=16; L=4 is
d_model 256 (two heads) at T=256, B=8; vocabulary 257 (the byte tokenizer's), float32.

For every case (variant, K, L) a worker subprocess builds the train step the way the run
code does (flt_jax.train.state / optimizer / step, jit with a donated state; on the CPU
devices of the tree's cpu preset, config.mesh.cpu_devices, with the batch split over
them, column `dev`) and times:
  step   the jitted train_step on a fixed batch (steady state, compile excluded),
  fwd    jit(loss_fn) forward only,
  grad   jit(value_and_grad(loss_fn)),
  update jit(optimizer.update + apply_updates) on gradients of the right shapes,
and prints tokens/s of the step and grad/fwd. Then (unless --no_main) it runs
`python -m flt_jax.main --config=experiments/flt_12loop.py ...` for each --main_cases
entry with the default log_every and reports the median tokens/s of its steady-state
progress lines (the first two lines include compilation and are dropped).

With --baseline=REF the same is measured for REF, checked out with `git worktree add
--detach` into a temporary directory: the two trees run alternately (ABAB.., order
flipped every round) in separate subprocesses over --rounds rounds, and each figure is
reported with the per-round ratio new/baseline (median over rounds). Timings on a shared
machine are noisy; read the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 257  # the byte tokenizer's vocabulary (256 bytes + separator)
SEQ = 256


def case_shape(layers: int) -> dict:
  """The reference's shape rule (d_model = 64 L, head dim 128) and this benchmark's batch."""
  d_model = 64 * layers
  n_head = max(1, -(-d_model // 128))
  batch = 16 if layers <= 2 else 8
  return dict(n_layer=layers, d_model=d_model, n_head=n_head, n_kv_head=n_head, batch=batch)


# ----------------------------------------------------------------------------- worker
# Runs inside the tree being measured (cwd and sys.path), so it only uses APIs that the
# baseline commit a7440c2 and later commits share.


def _set_remat(config, remat: str) -> None:
  """remat is 'preset' (keep the experiment's) or PLACE[:POLICY], e.g. block:attn_out."""
  if remat != "preset":
    place, _, policy = remat.partition(":")
    config.model.remat = place
    if policy:
      config.model.remat_policy = policy


def _remat_overrides(remat: str) -> dict:
  if remat == "preset":
    return {}
  place, _, policy = remat.partition(":")
  return {"model.remat": place, **({"model.remat_policy": policy} if policy else {})}


def _tree_presets(tree: str):
  """The tree's own preset module, by file path: flt_jax/presets.py, or experiments/base.py
  in trees older than it (a7440c2). Importing `flt_jax.presets` by name would find an
  installed (editable) flt_jax's copy in a tree that has none."""
  import importlib.util

  path = os.path.join(tree, "flt_jax", "presets.py")
  if not os.path.exists(path):
    path = os.path.join(tree, "experiments", "base.py")
  spec = importlib.util.spec_from_file_location("_bench_presets", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_case(presets, variant: str, loops: int, layers: int, remat: str):
  """(model, optimizer, train state, batch) of one case, built the way the run code builds
  them; `presets` is the measured tree's preset module (step_profile.py shares this)."""
  import jax
  import jax.numpy as jnp

  from flt_jax.model import config as model_config
  from flt_jax.model.looped import LoopedTransformer
  from flt_jax.train import optimizer as optim_lib
  from flt_jax.train import state as state_lib

  shape = case_shape(layers)
  config = presets.make(variant, loops, "cpu")
  config.model.update({k: v for k, v in shape.items() if k != "batch"})
  config.model.seq_len = SEQ
  config.model.vocab_size = VOCAB
  _set_remat(config, remat)
  cfg = model_config.ModelConfig.from_config(config.model)
  model = LoopedTransformer(cfg)
  optimizer = optim_lib.make_optimizer(config.optim, d_model=cfg.d_model, total_steps=1000)
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), SEQ)
  # Non-zero projections, so that no multiplication by zero is special.
  state = state.replace(
    params=jax.tree_util.tree_map(lambda p: p + 0.01 * jnp.sign(p + 0.5), state.params)
  )
  tokens = jax.random.randint(jax.random.PRNGKey(1), (shape["batch"], SEQ + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return model, optimizer, state, batch


def data_parallel(devices):
  """(replicated, rows): shardings over a 1-D `data` mesh of `devices` for the state and
  for the batch split by rows (cpu_devices_bench.py shares this)."""
  import jax

  mesh = jax.sharding.Mesh(devices, ("data",))
  P = jax.sharding.PartitionSpec
  return jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))


def preset_cpu_devices(presets):
  """The CPU devices a run of the tree's cpu preset uses, set up the way its run does: the
  host split into config.mesh.cpu_devices devices (data-parallel) and freed host memory
  kept for reuse (cpu_reuse_memory). Call before anything touches a JAX backend."""
  import jax

  mesh = presets.make("FLT", 1, "cpu").get("mesh") or {}
  cpu_devices = int(mesh.get("cpu_devices", 0))
  if cpu_devices > 1:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if mesh.get("cpu_reuse_memory", False):
    from flt_jax.parallel import host_memory  # the tree has it when its preset sets it

    host_memory.reuse_freed_memory()
  return jax.devices()[: max(1, cpu_devices)]


def _worker(cases: list[dict], remat: str, reps: int) -> None:
  import functools

  import jax
  import optax

  from flt_jax.model.loss import loss_fn
  from flt_jax.train import step as step_lib

  sys.path.insert(0, os.getcwd())
  presets = _tree_presets(os.getcwd())
  devices = preset_cpu_devices(presets)
  replicated, rows = data_parallel(devices)

  built = []
  for case in cases:
    shape = case_shape(case["layers"])
    model, optimizer, state, batch = build_case(
      presets, case["variant"], case["loops"], case["layers"], remat
    )
    state, batch = jax.device_put(state, replicated), jax.device_put(batch, rows)
    step = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer, num_micro=1),
      donate_argnums=0,
      out_shardings=replicated,
    )
    fwd = jax.jit(lambda p, x, y, model=model: loss_fn(p, model, x, y)[0])
    grad = jax.jit(
      jax.value_and_grad(lambda p, x, y, model=model: loss_fn(p, model, x, y)[0]),
      out_shardings=replicated,
    )

    def update(grads, opt_state, params, optimizer=optimizer):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update)
    params = state.params
    t0 = time.perf_counter()
    _, grads = jax.block_until_ready(grad(params, batch["inputs"], batch["targets"]))
    jax.block_until_ready(fwd(params, batch["inputs"], batch["targets"]))
    jax.block_until_ready(update(grads, state.opt_state, params))
    state, _ = jax.block_until_ready(step(state, batch))
    compile_s = time.perf_counter() - t0
    built.append(
      dict(
        case=case,
        tokens=shape["batch"] * SEQ,
        step=step,
        fwd=fwd,
        grad=grad,
        update=update,
        state=state,
        batch=batch,
        grads=grads,
        compile_s=compile_s,
      )
    )
  print(json.dumps({"ready": True}), flush=True)

  for line in sys.stdin:
    i = int(line.strip())
    b = built[i]
    times = {"fwd": [], "grad": [], "update": [], "step": []}
    x, y = b["batch"]["inputs"], b["batch"]["targets"]
    for _ in range(reps):
      params = b["state"].params
      t0 = time.perf_counter()
      jax.block_until_ready(b["fwd"](params, x, y))
      times["fwd"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(b["grad"](params, x, y))
      times["grad"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(b["update"](b["grads"], b["state"].opt_state, params))
      times["update"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      b["state"], _ = b["step"](b["state"], b["batch"])
      jax.block_until_ready(b["state"])
      times["step"].append(time.perf_counter() - t0)
    out = {k: min(v) for k, v in times.items()}
    out.update(tokens=b["tokens"], compile_s=b["compile_s"], remat=remat, devices=len(devices))
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------- controller


class Worker:
  """One measuring subprocess in one source tree, kept alive across rounds."""

  def __init__(self, tree: str, cases: list[dict], remat: str, reps: int):
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--_worker",
      json.dumps(cases),
      f"--remat={remat}",
      f"--reps={reps}",
    ]
    self.proc = subprocess.Popen(
      cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker exited with {self.proc.wait()}")
      if line.startswith("{"):
        return json.loads(line)

  def wait_ready(self) -> None:
    self._read()

  def measure(self, i: int) -> dict:
    self.proc.stdin.write(f"{i}\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


_PROGRESS = re.compile(r"^step (\d+)/\d+ \| loss \S+ \| ([\d,]+) tok/s")


def main_command_tokens_per_s(tree: str, case: dict, steps: int, remat: str) -> float:
  """Median tokens/s of the main command's steady-state progress lines."""
  shape = case_shape(case["layers"])
  workdir = tempfile.mkdtemp(prefix="train_bench_")
  overrides = {
    "model.variant": case["variant"],
    "model.loops": case["loops"],
    "model.n_layer": shape["n_layer"],
    "model.d_model": shape["d_model"],
    "model.n_head": shape["n_head"],
    "model.n_kv_head": shape["n_kv_head"],
    "model.seq_len": SEQ,
    "train.steps": steps,
    "train.micro_batch_size": shape["batch"],
    "train.total_batch_tokens": shape["batch"] * SEQ,
    "train.eval_steps": 1,
  }
  overrides.update(_remat_overrides(remat))
  cmd = [
    sys.executable,
    "-m",
    "flt_jax.main",
    "--config=experiments/flt_12loop.py",
    f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in overrides.items()]
  try:
    out = subprocess.run(
      cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True
    )
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if out.returncode:
    raise RuntimeError(f"main command failed in {tree}:\n{out.stderr[-3000:]}")
  rates = [
    float(m.group(2).replace(",", "")) for m in map(_PROGRESS.match, out.stdout.splitlines()) if m
  ]
  if len(rates) < 3:
    raise RuntimeError(f"too few progress lines from the main command:\n{out.stdout[-2000:]}")
  return statistics.median(rates[2:])


def _parse_cases(text: str) -> list[dict]:
  cases = []
  for item in text.split(","):
    variant, loops, layers = item.split(":")
    cases.append(dict(variant=variant, loops=int(loops), layers=int(layers)))
  return cases


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv = lambda s: [x for x in s.split(",") if x]
  ints = lambda s: [int(x) for x in csv(s)]
  p.add_argument("--baseline", default="", help="git ref to compare against")
  p.add_argument(
    "--tree",
    action="append",
    default=[],
    help="NAME=PATH: also measure the source tree at PATH (e.g. a copy with local changes)",
  )
  p.add_argument(
    "--compare_remat",
    type=csv,
    default=[],
    help="also measure this tree at these remat settings (rows named @<setting>)",
  )
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per case and round")
  p.add_argument("--variants", type=csv, default=["FLT", "LT"])
  p.add_argument("--loops", type=ints, default=[1, 12])
  p.add_argument("--layers", type=ints, default=[2, 4])
  p.add_argument(
    "--remat",
    default="preset",
    help="remat of this tree and --tree trees: preset (the experiment's) or "
    "PLACE[:POLICY], e.g. none, loop, block:attn_out",
  )
  p.add_argument("--base_remat", default="preset", help="remat of the --baseline tree (same forms)")
  p.add_argument("--main_steps", type=int, default=30)
  p.add_argument("--main_cases", type=_parse_cases, default=_parse_cases("FLT:12:2,FLT:12:4"))
  p.add_argument("--no_main", action="store_true", help="skip the main-command runs")
  p.add_argument("--quick", action="store_true", help="FLT K=12 L=2 only, 1 round, 2 reps")
  p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _fmt_ratio(new: list[float], old: list[float], higher_is_better: bool) -> str:
  ratios = [(n / o if higher_is_better else o / n) for n, o in zip(new, old)]
  return f"{statistics.median(ratios):.2f}x"


def run(args) -> None:
  if args.quick:
    args.variants, args.loops, args.layers, args.rounds, args.reps = ["FLT"], [12], [2], 1, 2
    args.main_cases, args.main_steps = args.main_cases[:1], 30
  cases = [
    dict(variant=v, loops=k, layers=l)
    for l in args.layers
    for v in args.variants
    for k in args.loops
  ]
  trees = {"new": REPO}
  trees.update(item.split("=", 1) for item in args.tree)
  trees.update((f"@{r}", REPO) for r in args.compare_remat)
  tmp = None
  if args.baseline:
    tmp = tempfile.mkdtemp(prefix="train_bench_base_")
    base_tree = os.path.join(tmp, "tree")
    subprocess.run(
      ["git", "worktree", "add", "--detach", base_tree, args.baseline],
      cwd=REPO,
      check=True,
      capture_output=True,
    )
    trees["base"] = base_tree
  try:
    _measure(args, cases, trees)
  finally:
    if tmp:
      subprocess.run(["git", "worktree", "remove", "--force", trees["base"]], cwd=REPO)
      shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, cases, trees) -> None:
  names = list(trees)
  print(
    f"trees: {trees}; remat {args.remat}, baseline {args.base_remat}; "
    f"rounds={args.rounds}; reps={args.reps}",
    flush=True,
  )
  remat = {n: (args.base_remat if n == "base" else args.remat) for n in names}
  remat.update((f"@{r}", r) for r in args.compare_remat)
  workers = {n: Worker(t, cases, remat[n], args.reps) for n, t in trees.items()}
  try:
    for w in workers.values():
      w.wait_ready()
    results = {n: [[] for _ in cases] for n in names}
    for r in range(args.rounds):
      order = names if r % 2 == 0 else names[::-1]
      for i in range(len(cases)):
        for n in order:
          results[n][i].append(workers[n].measure(i))
  finally:
    for w in workers.values():
      w.close()

  med = lambda rows, key: statistics.median(row[key] for row in rows)
  header = (
    f"{'tree':18} {'case':14} {'remat':22} {'dev':>3} {'step tok/s':>10} {'step s':>7} {'fwd s':>7} "
    f"{'grad s':>7} {'update s':>8} {'grad/fwd':>8} {'compile s':>9}"
  )
  print("\nTrain step (min over reps, median over rounds)\n" + header)
  for i, case in enumerate(cases):
    label = f"{case['variant']} K={case['loops']} L={case['layers']}"
    for n in names:
      rows = results[n][i]
      step_s = med(rows, "step")
      print(
        f"{n:18} {label:14} {rows[0]['remat']:22} {rows[0].get('devices', 1):3} "
        f"{rows[0]['tokens'] / step_s:10,.0f} "
        f"{step_s:7.3f} {med(rows, 'fwd'):7.3f} {med(rows, 'grad'):7.3f} "
        f"{med(rows, 'update'):8.4f} {med(rows, 'grad') / med(rows, 'fwd'):8.2f} "
        f"{rows[0]['compile_s']:9.1f}"
      )
    new = results["new"][i]
    for n in names[1:]:
      old = results[n][i]
      print(
        f"{'':18} {label:14} new vs {n}: step "
        f"{_fmt_ratio([r['step'] for r in new], [r['step'] for r in old], False)} faster, "
        f"grad {_fmt_ratio([r['grad'] for r in new], [r['grad'] for r in old], False)}, "
        f"fwd {_fmt_ratio([r['fwd'] for r in new], [r['fwd'] for r in old], False)}"
      )

  if args.no_main:
    return
  print(f"\nMain command (default log_every, {args.main_steps} steps, steady-state lines)")
  for case in args.main_cases:
    label = f"{case['variant']} K={case['loops']} L={case['layers']}"
    rates = {n: [] for n in names}
    for r in range(args.rounds):
      for n in names if r % 2 == 0 else names[::-1]:
        rates[n].append(main_command_tokens_per_s(trees[n], case, args.main_steps, remat[n]))
    for n in names:
      print(f"{n:18} {label:14} {statistics.median(rates[n]):10,.0f} tok/s  rounds {rates[n]}")
    for n in names[1:]:
      print(f"{'':18} {label:14} new vs {n}: {_fmt_ratio(rates['new'], rates[n], True)}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args._worker:
    _worker(json.loads(args._worker), args.remat, args.reps)
  else:
    run(args)


if __name__ == "__main__":
  main()
