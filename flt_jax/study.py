r"""The stability study as one command: train several experiments on the same data and seed,
then draw the training dynamics the paper analyses (arXiv:2605.18797, section 3).

  python -m flt_jax.study --experiments=lt_12loop,lt_i_12loop,flt_12loop --steps=150 --out=DIR

Each experiment (a file in --experiments_dir, at --preset) trains in DIR/<name> with the
same seed and data, logging diagnostics every --log_every steps. Then DIR gets
  study.png    one panel each: train loss, residual-stream norm of the last loop, the
               largest per-layer gradient norm (over steps), and the residual norm of every
               loop at the last logged step; a line per run;
  summary.csv  and summary.md: final train and validation loss, max residual norm, max
               gradient norm, and whether the run diverged.
A run that already finished in DIR/<name> is not retrained (rerunning redraws the figure).
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import io
import json
import math
import re

from absl import app, flags, logging
from etils import epath

from flt_jax import cli, files, run
from flt_jax.train.checkpoint import CheckpointError
from flt_jax.workdir_lock import WorkdirLockedError


def known_experiments(experiments_dir: str) -> list[str]:
  """The experiment files' names in `experiments_dir` (not packages' __init__ or helpers)."""
  return sorted(
    p.stem
    for p in epath.Path(experiments_dir).glob("*.py")
    if not p.stem.startswith("_") and p.stem != "base"
  )


def load_experiment(experiments_dir: str, name: str, preset: str):
  path = epath.Path(experiments_dir) / f"{name}.py"
  if not name or name.startswith("_") or not path.exists():
    known = known_experiments(experiments_dir)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(
      f"--experiments: no experiment {name!r} in {experiments_dir}{hint}; known: "
      f"{', '.join(known) or 'none'}"
    )
  spec = importlib.util.spec_from_file_location(f"_study_{name}", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def _parse_value(text: str, current):
  """`text` as a value of the type of `current` (the field's value in the config)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("not a boolean (true or false)")
  if isinstance(current, str):
    return text
  if isinstance(current, int):
    number = float(text)  # 64, 64.0 and 1e3 are whole numbers; 64.5 is not
    if not number.is_integer():
      raise ValueError("not a whole number")
    return int(number)
  if isinstance(current, float):
    return float(text)
  return json.loads(text)


def apply_override(config, assignment: str) -> None:
  """`--set section.field=value` on `config`; ValueError naming the assignment and the
  fix for a key that does not exist or a value of the wrong type."""
  key, sep, text = assignment.partition("=")
  if not sep or not key:
    raise ValueError(f"--set={assignment!r} is not section.field=value, e.g. model.d_model=64")
  names = key.split(".")
  node = config
  for depth, name in enumerate(names):
    if not hasattr(node, "keys") or name not in node:
      parent = ".".join(names[:depth])
      close = difflib.get_close_matches(name, list(node.keys()) if hasattr(node, "keys") else [])
      hint = f" (did you mean {'.'.join([*names[:depth], close[0]])}?)" if close else ""
      raise ValueError(
        f"--set={assignment}: {'config.' + parent if parent else 'config'} has no field "
        f"{name!r}{hint}; --set takes an existing section.field (python -m flt_jax.main "
        "--config=FILE --print_config lists them)"
      )
    if depth < len(names) - 1:
      node = node[name]
  field = names[-1]
  current = node[field]
  try:
    value = _parse_value(text, current)
  except ValueError as e:
    raise ValueError(
      f"--set={assignment}: {key} is {type(current).__name__} ({current!r}), and {text!r} "
      f"is not one ({e})"
    ) from None
  node[field] = value


def read_metrics(workdir: epath.Path) -> dict[int, dict[str, float]]:
  """step -> the last record of that step's scalars (a resumed run appends). A line that
  is not a record (a partial line written before lines were appended whole) is skipped
  with a warning naming the file."""
  out: dict[int, dict[str, float]] = {}
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return out
  skipped = 0
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
      step = int(rec["step"])
    except (ValueError, KeyError, TypeError):
      skipped += 1
      continue
    out.setdefault(step, {}).update(rec)
  if skipped:
    print(f"warning: {path}: skipped {skipped} line(s) that are not metric records")
  return out


def _numbered(record: dict, prefix: str) -> list[float]:
  items = []
  for key, v in record.items():
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", key)
    if m:
      items.append((int(m.group(1)), float("nan") if v is None else float(v)))
  return [v for _, v in sorted(items)]


def curves(metrics: dict[int, dict[str, float]]) -> dict[str, list]:
  """Per-step series of one run: steps, loss, last-loop residual norm, max layer grad norm."""
  steps, loss, residual, grad = [], [], [], []
  last_loop_norms: list[float] = []
  for step in sorted(metrics):
    rec = metrics[step]
    if "train/loss" not in rec:
      continue
    norms = _numbered(rec, "loops/residual_norm_")
    grads = _numbered(rec, "grads/layer_")
    steps.append(step)
    loss.append(_float(rec["train/loss"]))
    residual.append(norms[-1] if norms else float("nan"))
    grad.append(max(grads) if grads else float("nan"))
    last_loop_norms = norms or last_loop_norms
  return {
    "step": steps,
    "loss": loss,
    "residual": residual,
    "grad": grad,
    "loop_norms": last_loop_norms,
  }


def _float(v) -> float:
  return float("nan") if v is None else float(v)


def summarize(name: str, metrics: dict[int, dict[str, float]]) -> dict:
  c = curves(metrics)
  evals = [_float(r["eval/loss"]) for _, r in sorted(metrics.items()) if "eval/loss" in r]
  nonfinite = max(
    (int(r.get("train/nonfinite_total", 0) or 0) for r in metrics.values()), default=0
  )
  finite = lambda xs: [x for x in xs if math.isfinite(x)]
  values = c["loss"] + c["residual"] + c["grad"]
  diverged = (
    nonfinite > 0
    or len(finite(values)) < len(values)
    or (len(c["loss"]) > 1 and c["loss"][-1] > c["loss"][0])
  )
  return {
    "run": name,
    "final_train_loss": c["loss"][-1] if c["loss"] else float("nan"),
    "final_val_loss": evals[-1] if evals else float("nan"),
    "max_residual_norm": max(finite(c["residual"]), default=float("nan")),
    "max_grad_norm": max(finite(c["grad"]), default=float("nan")),
    "diverged": "yes" if diverged else "no",
  }


def write_summary(out: epath.Path, rows: list[dict]) -> str:
  fields = list(rows[0])
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(out / "summary.csv", text.getvalue())
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in fields) + " |" for r in rows]
  table = "\n".join(lines) + "\n"
  files.write_atomic(out / "summary.md", table)
  return table


def plot(out: epath.Path, runs: dict[str, dict[str, list]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  panels = [
    ("loss", "train loss", False),
    ("residual", "residual norm, last loop", True),
    ("grad", "max per-layer gradient norm", True),
  ]
  for ax, (key, title, log) in zip(axes, panels):
    for name, c in runs.items():
      ax.plot(c["step"], c[key], label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log:
      ax.set_yscale("log")
  for name, c in runs.items():
    axes[3].plot(range(len(c["loop_norms"])), c["loop_norms"], marker="o", label=name)
  axes[3].set_title("residual norm per loop, last logged step")
  axes[3].set_xlabel("loop")
  axes[3].set_yscale("log")
  axes[0].legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  files.write_atomic(out / "study.png", png.getvalue())
  plt.close(fig)


def study_configs(
  experiments, *, steps, log_every, preset="cpu", experiments_dir="experiments", overrides=()
) -> dict:
  """{name: resolved config} of every run of the study. Every name, override and field is
  checked here (ValueError / ConfigError naming it), before anything is written."""
  if not experiments or not all(experiments):
    raise ValueError(
      f"--experiments={','.join(experiments or [])!r} names no experiment: give one or more "
      "comma-separated names, e.g. --experiments=lt_12loop,flt_12loop"
    )
  configs = {}
  for name in experiments:
    config = load_experiment(experiments_dir, name, preset)
    config.train.steps = steps
    config.train.log_every = log_every
    config.train.eval_every = steps
    for assignment in overrides:
      apply_override(config, assignment)
    configs[name] = run.resolve_config(config)
  return configs


def run_study(
  experiments, *, out, steps, log_every, preset="cpu", experiments_dir="experiments", overrides=()
) -> str:
  configs = study_configs(
    experiments,
    steps=steps,
    log_every=log_every,
    preset=preset,
    experiments_dir=experiments_dir,
    overrides=overrides,
  )
  out = epath.Path(out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out={out} cannot be created ({e}); choose another directory") from None
  runs, rows = {}, []
  for name, config in configs.items():
    workdir = out / name
    run.train_and_evaluate(config, str(workdir))
    metrics = read_metrics(workdir)
    runs[name] = curves(metrics)
    rows.append(summarize(name, metrics))
  plot(out, runs)
  return write_summary(out, rows)


def define_flags() -> None:
  """Defines the command's flags. Called only when the module runs as a program: absl
  flags are global, so the commands' functions can be imported side by side."""
  flags.DEFINE_list("experiments", None, "Experiment names (files in --experiments_dir).")
  flags.DEFINE_string("experiments_dir", "experiments", "Where the files are.")
  flags.DEFINE_string("preset", "cpu", "Preset of every experiment.")
  flags.DEFINE_integer("steps", 150, "Training steps of each run.")
  flags.DEFINE_integer("log_every", 5, "Diagnostics (norms, gradients) interval.")
  flags.DEFINE_string("out", None, "Output directory (local or gs://).")
  flags.DEFINE_multi_string(
    "set", [], "Extra override for every run, as section.field=value (e.g. model.d_model=64)."
  )
  flags.mark_flags_as_required(["experiments", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # the runs' own lines, not absl's and Orbax's INFO
  try:
    table = run_study(
      flags.FLAGS.experiments,
      out=flags.FLAGS.out,
      steps=flags.FLAGS.steps,
      log_every=flags.FLAGS.log_every,
      preset=flags.FLAGS.preset,
      experiments_dir=flags.FLAGS.experiments_dir,
      overrides=flags.FLAGS.set,
    )
  except (
    ValueError,
    CheckpointError,
    run.NonFiniteError,
    WorkdirLockedError,
    files.FileWriteError,
  ) as e:
    raise SystemExit(f"error: {e}") from None
  print(table)
  print(f"figure: {epath.Path(flags.FLAGS.out) / 'study.png'}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
