"""One-shot check of a GPU or TPU machine, unattended, in one table (<= 8 minutes).

  python benchmarks/device_check.py [--budget_s=480] [--parts=tests,numerics,attention,train]
      [--impls=xla,pallas,auto,cudnn|splash] [--train_steps=10] [--dry_run]

Parts, each in its own process with its own share of the time budget; a part that fails
or runs out of time is a row of the table and the others still run:
  tests      the kernel and model tests natively on the device (JAX_PLATFORMS cleared)
  numerics   our Pallas kernel and the platform's fused kernel against XLA attention on
             the device: forward and gradients, bf16, GQA 4:1, full and windowed
  attention  benchmarks/attention_bench.py: T 1024/4096/8192, head dim 128, bf16, GQA 4:1,
             with and without a window, pallas vs xla vs the fused kernel
  train      the train step at the paper preset's model shape (FLT K=12, L=6, d 384,
             T 1024, bf16) with each attention kernel: tokens/s and MFU against the
             device's peak (train.metrics)
--dry_run runs every part at tiny shapes (on CPU: the interpreter for Pallas), to check the
script and its table, not the device. Each part's full output goes to --log_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT = "DEVICE_CHECK_RESULT "  # a worker's last line: this prefix, then JSON rows
# Shares of the budget (the rest is process start-up and slack).
SHARES = {"tests": 0.25, "numerics": 0.1, "attention": 0.25, "train": 0.32}
NATIVE_TESTS = (
  "tests/kernels/test_flash_attention.py",
  "tests/kernels/test_fused.py",
  "tests/kernels/test_model_pallas.py",
  "tests/model/test_looped.py",
)


@dataclasses.dataclass
class Row:
  part: str
  case: str
  status: str  # ok | FAILED | TIMEOUT | skipped
  figures: str


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--budget_s", type=float, default=480.0)
  p.add_argument("--parts", type=csv, default=list(SHARES))
  p.add_argument("--impls", type=csv, default=None, help="train kernels (default: all here)")
  p.add_argument("--train_steps", type=int, default=10)
  p.add_argument("--dry_run", action="store_true", help="tiny shapes: checks the script only")
  p.add_argument("--log_dir", default="/tmp/device_check")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--impl", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = sorted(set(args.parts) - set(SHARES))
  if unknown:
    p.error(f"--parts has unknown {unknown}; choose from {list(SHARES)}")
  if args.budget_s < 30:
    p.error(f"--budget_s={args.budget_s} leaves no time for a part; give 30 or more")
  return args


# ----------------------------------------------------------------------------
# The parent: one process per part, time-boxed, one table.
# ----------------------------------------------------------------------------


def _child_env(dry_run: bool) -> dict:
  env = dict(os.environ)
  if not dry_run:
    env["JAX_PLATFORMS"] = ""  # the device, even under tests/conftest.py's cpu default
  return env


def run_part(args, part: str, extra: list[str], timeout_s: float, log: pathlib.Path) -> list[Row]:
  """Runs one worker; its rows, or one row saying how it failed."""
  cmd = [sys.executable, __file__, f"--worker={part}", f"--train_steps={args.train_steps}"]
  cmd += ["--dry_run"] * args.dry_run + extra
  case = extra[0].split("=", 1)[1] if extra else part
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      cmd,
      cwd=REPO,
      env=_child_env(args.dry_run),
      capture_output=True,
      text=True,
      timeout=max(timeout_s, 1),
    )
  except subprocess.TimeoutExpired as e:
    log.write_text(f"{cmd}\n{e.stdout or ''}\n{e.stderr or ''}")
    return [Row(part, case, "TIMEOUT", f"stopped after {timeout_s:.0f} s (log: {log})")]
  log.write_text(f"{cmd}\n{proc.stdout}\n{proc.stderr}")
  seconds = time.perf_counter() - start
  lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
  if proc.returncode or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return [Row(part, case, "FAILED", f"rc {proc.returncode}: {last} (log: {log})")]
  rows = [Row(**row) for row in json.loads(lines[-1][len(RESULT) :])]
  for row in rows:
    row.figures += f" [{seconds:.0f} s]" if row is rows[-1] else ""
  return rows


def _platform_and_impls(args) -> tuple[str, str, list[str]]:
  """(platform, device description, train kernels), from a child process: the parent
  never starts a backend, so the device is free for the workers."""
  code = (
    "import jax; d = jax.devices(); "
    "print(d[0].platform, len(d), d[0].device_kind, jax.__version__, sep='|')"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=_child_env(args.dry_run),
    capture_output=True,
    text=True,
    timeout=120,
  )
  if proc.returncode:
    raise SystemExit(f"error: JAX could not start here: {proc.stderr.strip()[-500:]}")
  platform, count, kind, version = proc.stdout.strip().splitlines()[-1].split("|")
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  fused = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(platform, [])
  default = ["xla", "auto"] if platform == "cpu" else ["xla", "pallas", "auto", *fused]
  impls = args.impls or default  # on CPU, pallas in the model is the interpreter: hours
  return platform, f"{count} x {kind} ({platform}), jax {version}", impls


def format_table(rows: list[Row], title: str) -> str:
  """The title, a header and one line per row, columns aligned."""
  widths = [
    max(len(getattr(r, f)) for r in rows + [Row("part", "case", "status", "")])
    for f in ("part", "case", "status")
  ]
  lines = [title, f"{'part':{widths[0]}}  {'case':{widths[1]}}  {'status':{widths[2]}}  figures"]
  for r in rows:
    lines.append(f"{r.part:{widths[0]}}  {r.case:{widths[1]}}  {r.status:{widths[2]}}  {r.figures}")
  return "\n".join(lines)


def main_parent(args) -> int:
  start = time.perf_counter()
  log_dir = pathlib.Path(args.log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  platform, device, impls = _platform_and_impls(args)
  rows: list[Row] = []
  for part in args.parts:
    budget = SHARES[part] * args.budget_s
    if part == "train":
      for impl in impls:
        left = args.budget_s - (time.perf_counter() - start)
        share = min(budget / len(impls), left)
        if share < 5:
          rows.append(Row(part, impl, "skipped", "no time left in --budget_s"))
          continue
        rows += run_part(args, part, [f"--impl={impl}"], share, log_dir / f"train_{impl}.log")
    else:
      share = min(budget, args.budget_s - (time.perf_counter() - start))
      rows += run_part(args, part, [], share, log_dir / f"{part}.log")
  total = time.perf_counter() - start
  title = f"device check: {device}{' (dry run: tiny shapes)' * args.dry_run} | {total:.0f} s"
  print(format_table(rows, title), flush=True)
  return 0 if all(r.status == "ok" for r in rows) else 1


# ----------------------------------------------------------------------------
# Workers: each prints its rows as the last line (RESULT + JSON).
# ----------------------------------------------------------------------------


def _emit(rows: list[Row]) -> None:
  print(RESULT + json.dumps([dataclasses.asdict(r) for r in rows]), flush=True)


def worker_tests(args) -> list[Row]:
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"]
  if args.dry_run:
    cmd += ["tests/kernels/test_target_dispatch.py", "-k", "describe"]
  else:
    cmd += list(NATIVE_TESTS)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  print(proc.stdout[-6000:], proc.stderr[-3000:])
  summary = (proc.stdout.strip().splitlines() or ["no summary"])[-1]
  failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
  status = "ok" if proc.returncode == 0 else "FAILED"
  figures = summary + (f"; failed: {', '.join(failed[:3])}" if failed else "")
  return [Row("tests", "kernels + model on the device", status, figures)]


def worker_numerics(args) -> list[Row]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flt_jax.model import attention

  platform = attention.current_platform()
  fused = {"gpu": "cudnn", "tpu": "splash"}.get(platform)
  B, T, H, Hkv, D = (1, 256, 4, 1, 64) if args.dry_run else (2, 1024, 16, 4, 128)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, g = (
    jax.random.normal(key, (B, T, h, D), jnp.bfloat16) for key, h in zip(keys, (H, Hkv, Hkv, H))
  )
  rows = []
  for window in (-1, T // 4):
    options = attention.KernelOptions(windows=(-1, T // 4), platform=platform)

    def out_and_grads(impl, window=window, options=options):
      fn = lambda q, k, v: attention.attend(q, k, v, window_left=window, impl=impl, options=options)
      out, vjp = jax.vjp(fn, q, k, v)
      return (out, *vjp(g))

    with jax.default_matmul_precision("default"):
      reference = jax.jit(lambda: out_and_grads("xla"))()
      for impl in ["pallas"] + ([fused] if fused else []):
        try:
          got = jax.jit(lambda impl=impl: out_and_grads(impl))()
        except Exception as e:  # a kernel that fails is this row's result
          rows.append(
            Row("numerics", f"{impl} w={window}", "FAILED", f"{type(e).__name__}: {str(e)[:120]}")
          )
          continue
        errors = [
          float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
          for a, b in zip(got, reference)
        ]
        # bf16 inputs and outputs: a few bf16 ulps of values of order 1 is agreement.
        ok = all(np.isfinite(errors)) and max(errors) < 0.1
        figures = " ".join(
          f"{name} {err:.1e}" for name, err in zip(("out", "dq", "dk", "dv"), errors)
        )
        rows.append(
          Row(
            "numerics",
            f"{impl} vs xla T={T} w={window}",
            "ok" if ok else "FAILED",
            "max|diff| " + figures,
          )
        )
  return rows


def worker_attention(args) -> list[Row]:
  cmd = [sys.executable, "benchmarks/attention_bench.py"]
  if not args.dry_run:
    cmd += ["--seq_lens=1024,4096,8192", "--head_dim=128", "--n_head=16", "--n_kv_head=4"]
    cmd += ["--dtype=bfloat16", "--window=1024", "--steps=5"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  print(proc.stdout, proc.stderr[-3000:])
  rows = []
  for line in proc.stdout.splitlines():
    fields = line.split()
    if len(fields) >= 3 and fields[1].isdigit() and fields[2].lstrip("-").isdigit():
      impl, T, window = fields[:3]
      case = f"{impl} T={T} w={window}"
      if "failed:" in line:
        rows.append(Row("attention", case, "FAILED", line.split("failed:", 1)[1].strip()[:120]))
      else:
        fwd_ms, fwd_tf, both_ms, both_tf = fields[3:7]
        vs = f" | vs fused {fields[7]}" if len(fields) > 7 else ""
        figures = f"fwd {fwd_ms} ms {fwd_tf} TF/s | f+b {both_ms} ms {both_tf} TF/s{vs}"
        rows.append(Row("attention", case, "ok", figures))
  if proc.returncode or not rows:
    last = (proc.stderr.strip().splitlines() or ["no rows"])[-1][:160]
    rows.append(Row("attention", "attention_bench.py", "FAILED", f"rc {proc.returncode}: {last}"))
  return rows


def worker_train(args) -> list[Row]:
  import jax
  import numpy as np

  from experiments import flt_12loop
  from flt_jax import aot, run
  from flt_jax.train import metrics as metrics_lib

  devices = jax.devices()
  config = flt_12loop.get_config("cpu" if args.dry_run else "paper")
  config.model.attention_impl = args.impl
  rows_per_device = 2 if args.dry_run else 16
  config.train.micro_batch_size = rows_per_device * len(devices)
  config.train.total_batch_tokens = config.train.micro_batch_size * config.model.seq_len
  config.mesh.update(cpu_devices=0, data=1, fsdp=-1)
  program = run.build_program(config, 256 if args.dry_run else aot.DEFAULT_VOCAB_SIZE, devices)
  step = program.train_step()
  batch_sharding = program.batch_sharding
  state = program.init_state()
  rng = np.random.default_rng(0)
  shape = (program.global_batch_size, program.model_cfg.seq_len)
  tokens = jax.device_put(
    rng.integers(0, program.model_cfg.vocab_size, shape, dtype=np.int32), batch_sharding
  )
  batch = {"inputs": tokens, "targets": tokens}
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  steps = 2 if args.dry_run else args.train_steps
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  tokens_per_s = steps * shape[0] * shape[1] / (time.perf_counter() - start)
  peak = metrics_lib.peak_flops_per_device(local_devices=len(devices))
  mfu = metrics_lib.compute_mfu(
    tokens_per_s, metrics_lib.flops_per_token(program.model_cfg), len(devices), peak
  )
  loss = float(jax.device_get(metrics["loss"]))
  mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (peak unknown)"
  figures = (
    f"{tokens_per_s:,.0f} tok/s, {mfu_text}, first step {compile_s:.0f} s, loss {loss:.3f} | "
    f"{program.model_cfg.describe_attention()}"
  )
  status = "ok" if np.isfinite(loss) else "FAILED"
  return [Row("train", args.impl, status, figures)]


WORKERS = {
  "tests": worker_tests,
  "numerics": worker_numerics,
  "attention": worker_attention,
  "train": worker_train,
}


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    _emit(WORKERS[args.worker](args))
    return 0
  return main_parent(args)


if __name__ == "__main__":
  sys.exit(main())
