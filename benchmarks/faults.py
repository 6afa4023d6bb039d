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
  parser.add_argument("--keep", action="store_true", help="keep the temporary workdirs")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  tmp = Path(tempfile.mkdtemp(prefix="flt_faults_"))
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
  print("| what | count |\n|---|---|")
  print(f"| faults injected (SIGKILL) | {faults} |")
  print(f"| of them while an async save was in flight | {during_save} |")
  print(f"| resumes | {len(resumed_steps)} |")
  print(f"| resumes that were exact | {exact} |")
  print(f"| checkpoints lost | {lost} |")
  print(f"| final run finished all {args.steps} steps | {finished} |")
  print(f"| every step's loss equals the uninterrupted run's (1e-6) | {all_equal} |")
  if args.keep:
    print(f"workdirs kept in {tmp}")
  else:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
