"""Quality against compute of per-token exit (model/exit.py): a CSV with a row per exit
rule and per fixed loop count K', and a plot of quality (answer accuracy on synthetic
tasks, else bits per byte or loss) against the mean loops run per token, the exit rules
as points beside the fixed-K' curve; on multihop one more panel per hop count.

The x axis is the mean exit loop per token (answer tokens where the task has answers):
what decoding the tokens one at a time executes. For a fixed K' it is K'. The
teacher-forced pass's own figure (executed_loops: a loop runs while any token of its
batch is active) is a column of the CSV. run/report.py decides which files an eval
writes; these are the formats, written whole through etils.epath (files.write_atomic).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping

from etils import epath

from flt_jax.eval import sweep_report
from flt_jax.files import write_atomic

HOPS_ACCURACY = "answer_accuracy_hops"  # + the hop count (also the loop sweep's)
HOPS_EXIT = "mean_exit_loop_answers_hops"  # + the hop count
RULE_FIELDS = ("criterion", "threshold", "min_loops", "max_loops")
COLUMNS = ("kind", "rule") + RULE_FIELDS + ("mean_loops",)
FIRST_METRICS = (
  "answer_accuracy",
  "loss",
  "bpb",
  "mean_exit_loop_answers",
  "mean_exit_loop",
  "mean_exit_loop_inputs",
  "executed_loops",
)


def quality_metric(metrics: Mapping[str, float]) -> str:
  """The quality an exit table plots: answer accuracy, else bpb, else loss."""
  for name in ("answer_accuracy", "bpb", "loss"):
    if name in metrics:
      return name
  raise ValueError(f"no quality metric among {sorted(metrics)}")


def compute_metric(metrics: Mapping[str, float]) -> str:
  """The mean exit loop an exit table plots: over answer tokens where there are some."""
  return "mean_exit_loop_answers" if "mean_exit_loop_answers" in metrics else "mean_exit_loop"


def rows(fixed: Mapping[int, Mapping], exits: Mapping[str, Mapping]) -> list[dict]:
  """One dict per CSV row: the fixed K' first (mean_loops = K'), then each exit rule
  ({'criterion', 'threshold', 'min_loops', 'max_loops', 'metrics'}) with its mean exit
  loop as mean_loops."""
  out = []
  for k in sorted(fixed, key=int):
    out.append(
      {
        "kind": "fixed",
        "rule": f"K'={int(k)}",
        "min_loops": int(k),
        "max_loops": int(k),
        "mean_loops": float(k),
        **fixed[k],
      }
    )
  for name, entry in exits.items():
    metrics = entry["metrics"]
    out.append(
      {
        "kind": "exit",
        "rule": name,
        **{field: entry[field] for field in RULE_FIELDS},
        "mean_loops": metrics.get(compute_metric(metrics)),
        **metrics,
      }
    )
  return out


def write_exit_csv(table_rows: list[dict], path) -> epath.Path:
  """The rows as a CSV: the rule columns, then every metric (first the ones plotted);
  a value missing from a row is an empty cell, floats are written exactly (repr)."""
  if not table_rows:
    raise ValueError("the exit table has no rows; give at least one rule or K'")
  present = {k for row in table_rows for k in row} - set(COLUMNS)
  metrics = [m for m in FIRST_METRICS if m in present] + sorted(present - set(FIRST_METRICS))
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow([*COLUMNS, *metrics])
  for row in table_rows:
    writer.writerow([_cell(row.get(c)) for c in (*COLUMNS, *metrics)])
  return write_atomic(path, out.getvalue())


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "" if math.isnan(value) else repr(value)
  return str(value)


def read_exit_csv(path) -> list[dict[str, str]]:
  """The rows of write_exit_csv as strings (empty cells left out)."""
  text = epath.Path(path).read_text()
  return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(io.StringIO(text))]


def plot_exit(
  fixed: Mapping[int, Mapping],
  exits: Mapping[str, Mapping],
  trained_loops: int,
  path,
  title: str = "",
) -> epath.Path:
  """A PNG: quality against the mean loops per token, the fixed-K' curve and a point per
  exit rule (a marker per criterion, labelled with its threshold); a panel per hop count
  when the results hold per-hop accuracies."""
  every = [*fixed.values(), *(e["metrics"] for e in exits.values())]
  if not every:
    raise ValueError("the exit table has nothing to plot")
  quality = quality_metric(every[0])
  hops = sorted(
    {int(k.removeprefix(HOPS_ACCURACY)) for m in every for k in m if k.startswith(HOPS_ACCURACY)}
  )
  panels = [(quality, compute_metric(every[-1]), "all")] + [
    (f"{HOPS_ACCURACY}{h}", f"{HOPS_EXIT}{h}", f"{h} hop{'s' if h > 1 else ''}") for h in hops
  ]
  fig = sweep_report.new_figure(figsize=(4.0 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  markers = {"latent_diff": "o", "kl": "s", "argmax_stable": "^"}
  for ax, (y_name, x_name, what) in zip(axes, panels):
    ks = sorted(int(k) for k in fixed if y_name in fixed[k])
    ax.plot(ks, [fixed[k][y_name] for k in ks], color="0.4", marker=".", label="fixed K'")
    for criterion, marker in markers.items():
      points = [
        (e["metrics"][x_name], e["metrics"][y_name], e)
        for e in exits.values()
        if e["criterion"] == criterion and x_name in e["metrics"] and y_name in e["metrics"]
      ]
      if not points:
        continue
      ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=criterion)
      for x, y, e in points:
        ax.annotate(
          _threshold_text(e), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    ax.axvline(trained_loops, color="tab:red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("mean loops run per token" + (" (answers)" if "answers" in x_name else ""))
    ax.set_title(f"{sweep_report.METRIC_TITLES.get(quality, quality)}: {what}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return sweep_report.save_png(fig, path)


def _threshold_text(entry: Mapping) -> str:
  if entry["criterion"] == "argmax_stable":
    return str(int(entry["threshold"]))
  return f"{entry['threshold']:g}"


def write_exit_report(
  fixed: Mapping[int, Mapping],
  exits: Mapping[str, Mapping],
  trained_loops: int,
  out_dir,
  name: str,
  title: str = "",
) -> dict[str, epath.Path]:
  """OUT_DIR/<name>.csv and OUT_DIR/<name>.png; returns {'csv': path, 'png': path}."""
  out_dir = epath.Path(out_dir)
  return {
    "csv": write_exit_csv(rows(fixed, exits), out_dir / f"{name}.csv"),
    "png": plot_exit(fixed, exits, trained_loops, out_dir / f"{name}.png", title=title),
  }
