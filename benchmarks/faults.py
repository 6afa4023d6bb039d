r"""Fault injection: SIGKILL a training run again and again (also while it saves), resume it,
and check that nothing is lost and every resume continues exactly.

  python benchmarks/faults.py --faults=20

A tiny FLT trains for --steps steps with a checkpoint every 2 steps. One uninterrupted run
gives the reference losses. Then the same command is started in a second workdir and killed
with SIGKILL --faults times: half of the kills at a random moment (within 1.5 s of the
attempt's first logged step), half as soon as an Orbax save is in flight (a temporary checkpoint directory exists). After each kill the command is
simply run again. Printed at the end:
  faults injected, kills that hit a save in flight;
  resumes that were exact: the run resumed from the newest complete checkpoint present at
  the kill, and every loss it logged equals the uninterrupted run's (atol 1e-6);
  checkpoints lost: resumes that started before the newest complete checkpoint, or failed.

--reader_rounds=N (default 3): a second phase runs every reader beside a live run that saves
every step (eval at K'=1, export, sample, and the same training command a second time),
N rounds back to back, then stops the live run with SIGTERM (a preemption: it saves and
exits 0). The live run must exit rc 0 with a checkpoint for every step it reached, each
reader must succeed, the second run must be refused, and no temporary checkpoint
directory may be left behind.

--writer_kills=N (default 6): a third phase SIGKILLs the eval sweep and the export N times
each at a random moment of their run (after a good result file exists); the previous
eval_step<N>.json must still parse with its earlier rows and the previous .npz must still
load whole. Half of the kills come at a random moment, half as soon as the writer's
temporary file (.<name>.<pid>.tmp) appears; kills that found it on disk are counted: those
hit the write itself.

--faults=0 --reader_rounds=0 --writer_kills=0 selects nothing; each phase runs on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
  "--config.model.loops=3",
  "--config.model.n_layer=1",
  "--config.model.d_model=32",
  "--config.model.seq_len=32",
  "--config.train.micro_batch_size=4",
  "--config.train.total_batch_tokens=128",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.checkpoint.every_steps=2",
  "--config.checkpoint.keep=3",
]


def command(workdir: Path, steps: int) -> list[str]:
  return [
    sys.executable,
    "-m",
    "flt_jax.main",
    "--config=experiments/flt_12loop.py",
    f"--workdir={workdir}",
    f"--config.train.steps={steps}",
    *TINY,
  ]


def losses(workdir: Path) -> dict[int, float]:
  """step -> train loss; a resumed run appends, so the last record of a step wins."""
  out = {}
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:
      continue  # a line cut by the kill
    if "train/loss" in rec:
      out[rec["step"]] = rec["train/loss"]
  return out


def complete_checkpoints(workdir: Path) -> list[int]:
  root = workdir / "checkpoints"
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def temporary_dirs(workdir: Path) -> set[str]:
  """Orbax writes a save into a temporary directory and renames it when complete."""
  root = workdir / "checkpoints"
  return {p.name for p in root.iterdir() if "tmp" in p.name} if root.exists() else set()


def module_command(module: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", module, *flags]


def readers(workdir: Path, out: Path) -> dict[str, list[str]]:
  """Every reader of a workdir, as a user runs it: name -> command."""
  return {
    "eval K'=1": module_command(
      "flt_jax.main", f"--workdir={workdir}", "--mode=eval", "--eval_loops=1"
    ),
    "export": module_command("flt_jax.export", f"--workdir={workdir}", f"--out={out}"),
    "sample": module_command(
      "flt_jax.sample", f"--workdir={workdir}", "--prompt=1", "--max_new_tokens=2"
    ),
  }


def readers_beside_a_live_run(tmp: Path, rounds: int) -> list[tuple[str, object]]:
  """Phase 2: every reader, `rounds` times, while a run saves every step; then SIGTERM."""
  workdir = tmp / "live"
  steps = 100_000  # more than the rounds take: SIGTERM ends it
  live_cmd = command(workdir, steps) + [
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.keep=0",
  ]
  live = subprocess.Popen(live_cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ok = {name: 0 for name in readers(workdir, tmp / "r.npz")}
  ok["second training run refused"] = 0
  failed: list[str] = []
  done_rounds = 0
  while live.poll() is None and not complete_checkpoints(workdir):
    time.sleep(0.2)
  while live.poll() is None and done_rounds < rounds:
    second = subprocess.run(live_cmd, cwd=REPO, capture_output=True, text=True)
    if second.returncode != 0 and "is in use" in second.stderr:
      ok["second training run refused"] += 1
    elif live.poll() is None:
      failed.append(f"second run: rc {second.returncode}: {second.stderr.strip()[-300:]}")
    for name, cmd in readers(workdir, tmp / "r.npz").items():
      proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
      if proc.returncode == 0:
        ok[name] += 1
      else:
        failed.append(f"{name}: rc {proc.returncode}: {proc.stderr.strip()[-300:]}")
    done_rounds += 1
  running = live.poll() is None
  live.send_signal(signal.SIGTERM)
  output = live.communicate()[0].decode()
  saved = complete_checkpoints(workdir)
  every = bool(saved) and saved == list(range(1, saved[-1] + 1))
  if live.returncode != 0:
    print(output[-3000:])
  for line in failed:
    print("reader failed:", line)
  rows: list[tuple[str, object]] = [
    (f"reader rounds beside the live run (of {rounds})", done_rounds),
    ("live run still training after the rounds", running),
  ]
  rows += [
    (name if "refused" in name else f"{name} succeeded", count) for name, count in ok.items()
  ]
  rows += [
    ("readers that failed", len(failed)),
    ("live run (saving every step) exited rc 0 after SIGTERM", live.returncode == 0),
    (f"live run kept a checkpoint for each of its {len(saved)} steps", every),
    ("temporary checkpoint directories left", len(temporary_dirs(workdir))),
  ]
  return rows


def kill_writer(
  cmd: list[str], directory: Path, rng: random.Random, duration: float, at_write: bool
) -> tuple[bool, bool]:
  """Start cmd and SIGKILL it: at a random moment of a run that takes `duration`, or
  (at_write) as soon as its temporary file appears in `directory`. Returns (killed,
  whether the writer's temporary file was on disk at the kill)."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + rng.uniform(0.3 * duration, 1.05 * duration)

  def writing() -> bool:
    return any(p.name.endswith(".tmp") for p in directory.iterdir())

  while proc.poll() is None:
    if at_write and writing():
      break
    if not at_write and time.time() >= deadline:
      break
    if not at_write:
      time.sleep(0.002)
  if proc.poll() is not None:
    return False, False
  in_write = writing()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True, in_write


def timed_run(cmd: list[str]) -> float:
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return time.time() - start


def kills_of_writers(tmp: Path, kills: int, rng: random.Random) -> list[tuple[str, object]]:
  """Phase 3: SIGKILL the eval sweep and the export while they run; the previous results
  survive."""
  import numpy as np  # noqa: PLC0415 (phases 1-2 need no numpy here)

  workdir = tmp / "written"
  steps = 4
  subprocess.run(command(workdir, steps), cwd=REPO, check=True, capture_output=True)
  eval_cmd = readers(workdir, tmp / "x.npz")["eval K'=1"]
  timed_run(eval_cmd)  # the results file with K'=1
  table = workdir / f"eval_step{steps}.json"
  first = json.loads(table.read_text())
  export_path = tmp / "exports" / "x.npz"
  export_path.parent.mkdir()
  export_cmd = readers(workdir, export_path)["export"]
  export_seconds = timed_run(export_cmd)
  arrays = sorted(np.load(export_path).files)
  sweep_cmd = [c.replace("--eval_loops=1", "--eval_loops=2,3") for c in eval_cmd]
  sweep_seconds = timed_run(sweep_cmd)  # rows 2 and 3 written once, so a kill can lose them
  written = json.loads(table.read_text())
  rows: list[tuple[str, object]] = []
  for name, cmd, directory, seconds in (
    ("eval sweep", sweep_cmd, workdir, sweep_seconds),
    ("export", export_cmd, export_path.parent, export_seconds),
  ):
    killed = in_write = intact = 0
    for attempt in range(kills):
      hit, during = kill_writer(cmd, directory, rng, seconds, at_write=attempt % 2 == 1)
      killed += hit
      in_write += during
      if name == "export":
        with np.load(export_path) as z:
          intact += sorted(z.files) == arrays and all(z[k].size >= 0 for k in z.files)
      else:
        now = json.loads(table.read_text())
        intact += now == written and set(first) <= set(now)
    rows += [
      (f"{name}: SIGKILLs", killed),
      (f"{name}: of them with its temporary file on disk", in_write),
      (f"{name}: previous file intact after each attempt (of {kills})", intact),
    ]
  return rows


def run_reference(workdir: Path, steps: int) -> dict[int, float]:
  proc = subprocess.run(command(workdir, steps), cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"the uninterrupted run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return losses(workdir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--faults", type=int, default=20)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reader_rounds", type=int, default=3)
  parser.add_argument("--writer_kills", type=int, default=6)
  parser.add_argument("--keep", action="store_true", help="keep the temporary workdirs")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  tmp = Path(tempfile.mkdtemp(prefix="flt_faults_"))
  rows: list[tuple[str, object]] = []
  if args.faults:
    rows += kills_of_training(tmp, args, rng)
  if args.reader_rounds:
    rows += readers_beside_a_live_run(tmp, args.reader_rounds)
  if args.writer_kills:
    rows += kills_of_writers(tmp, args.writer_kills, rng)
  print("| what | count |\n|---|---|")
  for what, count in rows:
    print(f"| {what} | {count} |")
  if args.keep:
    print(f"workdirs kept in {tmp}")
  else:
    shutil.rmtree(tmp, ignore_errors=True)


def kills_of_training(tmp: Path, args, rng: random.Random) -> list[tuple[str, object]]:
  """Phase 1: SIGKILL training again and again, resume, compare with an uninterrupted run."""
  reference = run_reference(tmp / "reference", args.steps)
  workdir = tmp / "faulty"
  faults = during_save = exact = lost = 0
  resumed_steps: list[int] = []
  expected_resume = None  # newest complete checkpoint at the last kill
  while True:
    log_path = tmp / f"attempt{faults}.log"
    with open(log_path, "w") as log:
      proc = subprocess.Popen(command(workdir, args.steps), cwd=REPO, stdout=log, stderr=log)
      killed = False
      if faults < args.faults:
        mode_save = faults % 2 == 1
        # Random mode: a random moment within 1.5 s after this attempt logs its first step.
        delay, deadline = rng.uniform(0.0, 1.5), None
        seen = max(losses(workdir), default=0)
        leftovers = temporary_dirs(workdir)  # from a save killed earlier
        start = time.time()
        while proc.poll() is None:
          if deadline is None and max(losses(workdir), default=0) > seen:
            deadline = time.time() + delay
          if mode_save:
            hit = bool(temporary_dirs(workdir) - leftovers)
          else:
            hit = bool(deadline and time.time() >= deadline)
          if mode_save and time.time() - start > 60:
            hit = True  # no save seen within a minute: kill anyway
          if hit:
            in_save = bool(temporary_dirs(workdir) - leftovers)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
            faults += 1
            during_save += int(in_save)
            break
          time.sleep(0.005 if mode_save else 0.05)
      proc.wait()
    text = log_path.read_text()
    if expected_resume is not None:
      match = re.search(r"resumed from .* at step (\d+)", text)
      if not match and killed:
        continue  # killed before it restored anything: no resume to judge
      got = int(match.group(1)) if match else 0
      resumed_steps.append(got)
      now = losses(workdir)
      same = all(abs(now[s] - reference[s]) <= 1e-6 for s in now if s > got and s in reference)
      if got < expected_resume or (not killed and proc.returncode != 0):
        lost += 1
        print(
          f"attempt {len(resumed_steps)}: resumed at {got}, newest complete checkpoint "
          f"at the kill was {expected_resume} (log: {log_path})"
        )
      elif same and (killed or proc.returncode == 0):
        exact += 1
    if not killed:
      if proc.returncode != 0:
        print(text[-3000:])
      break
    expected_resume = max(complete_checkpoints(workdir), default=0)
  final = losses(workdir)
  finished = proc.returncode == 0 and max(final, default=0) == args.steps
  all_equal = finished and all(abs(final[s] - reference[s]) <= 1e-6 for s in reference)
  return [
    ("faults injected (SIGKILL)", faults),
    ("of them while an async save was in flight", during_save),
    ("resumes", len(resumed_steps)),
    ("resumes that were exact", exact),
    ("checkpoints lost", lost),
    (f"final run finished all {args.steps} steps", finished),
    ("every step's loss equals the uninterrupted run's (1e-6)", all_equal),
  ]


if __name__ == "__main__":
  main()
