"""Test-time loop sweep file formats: a CSV and a PNG of each metric against the
evaluation loop count K' (trained K marked), and the accuracy-by-hop-count x K' table and
heat map of the multi-hop task. The numbers come from eval/evaluator.py; run/report.py
decides which files a sweep writes.

Files are written whole (`files.write_atomic`: a kill mid-write leaves the previous
version) through etils.epath, so `out_dir` may be a local path or a gs:// URL. Figures are
drawn on a bare matplotlib Figure (Agg canvas, no pyplot state), so plotting works on
machines with no display and from any thread.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from flt_jax.files import write_atomic

# Plotted (and written first) in this order when present.
METRICS = ("loss", "bpb", "answer_accuracy", "h_change")
METRIC_TITLES = {
  "loss": "validation loss (nats/token)",
  "bpb": "bits per byte",
  "answer_accuracy": "answer accuracy",
  "h_change": "relative change of h, last loop (none at K'=1)",
}
# Why h_change is nan at one loop, for wherever the value is shown.
H_CHANGE_AT_ONE_LOOP = "n/a (one loop: no earlier h to compare with)"
LOOPS_COLUMN = "loops"
TRAINED_COLUMN = "trained_loops"


def describe(metrics: Mapping[str, float]) -> str:
  """One sweep row as text, 'loss 1.2345 | bpb ... | h_change ...', with the reason
  h_change has no value at K'=1 instead of a bare nan."""
  parts = []
  for name, v in metrics.items():
    if name == "tokens":
      continue
    if name == "h_change" and (v is None or math.isnan(v)):
      parts.append(f"h_change {H_CHANGE_AT_ONE_LOOP}")
    else:
      parts.append(f"{name} {v:.4f}")
  return " | ".join(parts)


def _format(value) -> str:
  return "" if value is None else repr(float(value))


def _parse(text: str) -> float | None:
  return None if text == "" else float(text)


def _column_order(results: Mapping[int, Mapping[str, float]]) -> list[str]:
  present = {k for row in results.values() for k in row}
  return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


# ----------------------------------------------------------------------------- loop sweep


def write_sweep_csv(
  results: Mapping[int, Mapping[str, float]], trained_loops: int, path
) -> epath.Path:
  """One row per K' in increasing order: loops, trained_loops, then every metric; a metric
  missing at some K' is an empty cell. Floats are written exactly (repr)."""
  if not results:
    raise ValueError("the loop sweep has no results to write; give at least one K'")
  columns = _column_order(results)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow([LOOPS_COLUMN, TRAINED_COLUMN, *columns])
  for loops in sorted(results):
    row = results[loops]
    writer.writerow([int(loops), int(trained_loops), *(_format(row.get(c)) for c in columns)])
  return write_atomic(path, out.getvalue())


def read_sweep_csv(path) -> tuple[dict[int, dict[str, float]], int]:
  """(results, trained_loops) as written by write_sweep_csv; empty cells are left out."""
  rows = list(csv.DictReader(io.StringIO(epath.Path(path).read_text())))
  results, trained = {}, None
  for row in rows:
    loops = int(row.pop(LOOPS_COLUMN))
    trained = int(row.pop(TRAINED_COLUMN))
    results[loops] = {k: v for k, v in ((k, _parse(v)) for k, v in row.items()) if v is not None}
  if trained is None:
    raise ValueError(f"{path} holds no sweep rows")
  return results, trained


def plot_sweep(
  results: Mapping[int, Mapping[str, float]],
  trained_loops: int,
  path,
  metrics: Sequence[str] | None = None,
  title: str = "",
) -> epath.Path:
  """A PNG with one panel per metric against K', the trained K as a dashed line."""
  if metrics is None:
    present = {k for row in results.values() for k in row}
    metrics = [m for m in METRICS if m in present]
  if not metrics:
    raise ValueError(f"no metric to plot; the sweep holds {_column_order(results)}")
  loops = sorted(results)
  fig = new_figure(figsize=(3.6 * len(metrics), 3.2))
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  for ax, metric in zip(axes, metrics):
    values = [results[k].get(metric, math.nan) for k in loops]
    ax.plot(loops, values, marker="o")
    ax.axvline(trained_loops, color="tab:red", linestyle="--", label=f"trained K={trained_loops}")
    ax.set_xticks(loops)
    ax.set_xlabel("loops at evaluation (K')")
    ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return save_png(fig, path)


def write_sweep_report(
  results: Mapping[int, Mapping[str, float]],
  trained_loops: int,
  out_dir,
  name: str = "loop_sweep",
  title: str = "",
) -> dict[str, epath.Path]:
  """OUT_DIR/<name>.csv and OUT_DIR/<name>.png; returns {'csv': path, 'png': path}."""
  out_dir = epath.Path(out_dir)
  return {
    "csv": write_sweep_csv(results, trained_loops, out_dir / f"{name}.csv"),
    "png": plot_sweep(results, trained_loops, out_dir / f"{name}.png", title=title),
  }


# ----------------------------------------------------------------------------- hops x K'


def write_hop_table(accuracy: Mapping[int, Mapping[int, float]], path) -> epath.Path:
  """accuracy[hops][K'] as a CSV: a row per hop count, a column per K' ('loops=K')."""
  if not accuracy:
    raise ValueError("the hop table has no rows; give accuracy[hops][loops]")
  loops = sorted({k for row in accuracy.values() for k in row})
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["hops", *(f"loops={k}" for k in loops)])
  for hops in sorted(accuracy):
    writer.writerow([int(hops), *(_format(accuracy[hops].get(k)) for k in loops)])
  return write_atomic(path, out.getvalue())


def read_hop_table(path) -> dict[int, dict[int, float]]:
  out = {}
  for row in csv.DictReader(io.StringIO(epath.Path(path).read_text())):
    hops = int(row.pop("hops"))
    out[hops] = {
      int(k.removeprefix("loops=")): float(v) for k, v in row.items() if v not in ("", None)
    }
  return out


def plot_hop_heatmap(
  accuracy: Mapping[int, Mapping[int, float]], trained_loops: int, path, title: str = ""
) -> epath.Path:
  """Heat map of answer accuracy, hop count (rows) x K' (columns), each cell annotated;
  the trained K's column is outlined."""
  hops = sorted(accuracy)
  loops = sorted({k for row in accuracy.values() for k in row})
  grid = np.array([[accuracy[h].get(k, math.nan) for k in loops] for h in hops], np.float64)
  fig = new_figure(figsize=(1.0 + 0.7 * len(loops), 1.2 + 0.5 * len(hops)))
  ax = fig.subplots()
  image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  for i in range(len(hops)):
    for j in range(len(loops)):
      if not math.isnan(grid[i, j]):
        color = "black" if grid[i, j] > 0.6 else "white"
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
  if trained_loops in loops:
    j = loops.index(trained_loops)
    from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top

    ax.add_patch(
      Rectangle((j - 0.5, -0.5), 1, len(hops), fill=False, edgecolor="tab:red", linewidth=2)
    )
  ax.set_xticks(range(len(loops)), [str(k) for k in loops])
  ax.set_yticks(range(len(hops)), [str(h) for h in hops])
  ax.set_xlabel(f"loops at evaluation (K'); trained K={trained_loops} outlined")
  ax.set_ylabel("hops")
  ax.set_title(title or "answer accuracy", fontsize=10)
  fig.colorbar(image, ax=ax)
  return save_png(fig, path)


def write_hop_report(
  accuracy: Mapping[int, Mapping[int, float]],
  trained_loops: int,
  out_dir,
  name: str = "hops_by_loops",
  title: str = "",
) -> dict[str, epath.Path]:
  """OUT_DIR/<name>.csv and OUT_DIR/<name>.png; returns {'csv': path, 'png': path}."""
  out_dir = epath.Path(out_dir)
  return {
    "csv": write_hop_table(accuracy, out_dir / f"{name}.csv"),
    "png": plot_hop_heatmap(accuracy, trained_loops, out_dir / f"{name}.png", title=title),
  }


def new_figure(figsize):
  """A bare matplotlib Figure (no pyplot state), constrained layout."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "the loop-sweep plots need matplotlib; install it with `pip install -r requirements.txt`"
    ) from e
  return Figure(figsize=figsize, layout="constrained")


def save_png(fig, path) -> epath.Path:
  """The figure as a PNG at `path`, written whole."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  return write_atomic(path, buffer.getvalue())
