"""The result files of evaluating a checkpoint, and their console tables: a loop sweep's
(`write_sweep`), per-token exit's quality-versus-compute table (`write_exit`,
`print_exit`), and a benchmark's results per step and K' (`write_task_results`,
`print_task_table`). Each table is read before any work (a damaged one stops the run
first), then written whole with every earlier row kept (`flt_jax.files`); process 0
writes."""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from flt_jax.eval import exit_report, sweep_report
from flt_jax.files import write_atomic
from flt_jax.run.report import say
from flt_jax.train import metrics as metrics_lib

# The multihop sweep's per-hop accuracy: this prefix + the hop count.
HOP_METRIC = exit_report.HOPS_ACCURACY


def _read_table(path: epath.Path, kind: str, parts: tuple[str, ...]) -> dict:
  """{part: object} of the results table an earlier evaluation of the same step and data
  wrote to `path` (empty objects when there is none), read before any work; ValueError
  naming the file if it is not a `kind` table."""
  if not path.exists():
    return {part: {} for part in parts}
  try:
    table = json.loads(path.read_text())
    found = {part: table[part] for part in parts}
    if not all(isinstance(value, dict) for value in found.values()):
      raise TypeError(f"{' or '.join(repr(p) for p in parts)} is not an object")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{path} is not a {kind} table ({type(e).__name__}: {e}); move it aside (mv {path} "
      f"{path}.bad) to start a new table for this step"
    ) from None
  return found


def read_sweep_table(path: epath.Path) -> dict:
  """{K': metrics} already written to `path` by earlier sweeps (see _read_table)."""
  return _read_table(path, "loop-sweep", ("loops",))["loops"]


def print_sweep(step: int, workdir: str, variant: str, trained_loops: int, results) -> None:
  say(f"checkpoint step {step} of {workdir} ({variant}, trained at K={trained_loops}):")
  for k, m in results.items():
    say(f"  loops {k:3d}: {sweep_report.describe(m)}")


def write_sweep(
  workdir: str, table_path: epath.Path, name: str, table: dict, results: dict, config
) -> None:
  """Adds `results` ({K': {metric: value}}) to `table` (its earlier K' under "loops") and
  writes the table (JSON), the sweep's CSV/PNG over every K' of the table, the hops x K'
  table and heat map when there are per-hop accuracies, and TensorBoard scalars with K'
  as the x axis. `name` (e.g. step300) suffixes every file."""
  step, trained_loops = table["step"], table["trained_loops"]
  # JSON has no NaN (h_change at K'=1): non-finite values are written as null.
  table["loops"].update({str(k): _finite(m) for k, m in results.items()})
  write_atomic(table_path, json.dumps(table, indent=1))
  every_k = {
    int(k): {n: (np.nan if v is None else v) for n, v in m.items()}
    for k, m in table["loops"].items()
  }
  files = sweep_report.write_sweep_report(
    every_k, trained_loops, workdir, name=f"loop_sweep_{name}", title=f"step {step}"
  )
  hop_accuracy = {}  # hops x K', from every K' swept at this step
  for k, metrics in every_k.items():
    for metric, v in metrics.items():
      if metric.startswith(HOP_METRIC):
        hop_accuracy.setdefault(int(metric.removeprefix(HOP_METRIC)), {})[k] = v
  if hop_accuracy:
    hop_files = sweep_report.write_hop_report(
      hop_accuracy,
      trained_loops,
      workdir,
      name=f"hops_by_loops_{name}",
      title=f"answer accuracy by hops, step {step}",
    )
    say(f"wrote {hop_files['csv']} and {hop_files['png']}")
  tb = config.metrics.tensorboard
  writer = metrics_lib.MetricsWriter(workdir, enabled=tb, tb_subdir=f"tb/loop_sweep_{name}")
  for k, metrics in sorted(results.items()):
    finite = {f"loop_sweep/{n}": v for n, v in metrics.items() if np.isfinite(v)}
    writer.write_scalars(k, finite)
  writer.close()
  say(f"wrote {table_path}, {files['csv']} and {files['png']}")


def read_exit_table(path: epath.Path) -> dict:
  """{'fixed': {K': metrics}, 'exit': {rule: entry}} already written to `path` by earlier
  exit evaluations (see _read_table)."""
  return _read_table(path, "per-token exit", ("fixed", "exit"))


def _finite(metrics: dict) -> dict:
  """NaN (h_change at K'=1) is None in JSON, and None NaN again when read."""
  return {n: (None if v is None or not np.isfinite(v) else float(v)) for n, v in metrics.items()}


def write_exit(
  workdir: str, table_path: epath.Path, name: str, table: dict, fixed: dict, results: dict
) -> None:
  """Adds the fixed-K' curve and the exit rules' `results` to `table` (its earlier ones
  under 'fixed' and 'exit') and writes it (JSON) with its CSV and PNG (`name`.csv/png)
  over everything the table then holds."""
  table["fixed"].update({str(k): _finite(m) for k, m in fixed.items()})
  for key, entry in results.items():
    table["exit"][key] = {**entry, "metrics": _finite(entry["metrics"])}
  write_atomic(table_path, json.dumps(table, indent=1))

  def present(metrics: dict) -> dict:
    return {n: v for n, v in metrics.items() if v is not None}

  every_fixed = {int(k): present(m) for k, m in table["fixed"].items()}
  every_exit = {k: {**e, "metrics": present(e["metrics"])} for k, e in table["exit"].items()}
  files = exit_report.write_exit_report(
    every_fixed,
    every_exit,
    table["trained_loops"],
    workdir,
    name=name,
    title=f"per-token exit, step {table['step']}",
  )
  say(f"wrote {table_path}, {files['csv']} and {files['png']}")


def print_exit(title: str, fixed: dict, results: dict) -> None:
  """A row per fixed K' and per exit rule: quality, then the compute it took."""
  every = [*fixed.values(), *(e["metrics"] for e in results.values())]
  if not every:
    return
  quality = exit_report.quality_metric(every[0])
  compute = exit_report.compute_metric(every[-1])
  hops = sorted(
    {int(n.removeprefix(HOP_METRIC)) for m in every for n in m if n.startswith(HOP_METRIC)}
  )
  columns = [(quality, quality), ("loss", "loss")] if quality != "loss" else [("loss", "loss")]
  columns += [("exit loop" + (" answers" if "answers" in compute else ""), compute)]
  columns += [("exit loop inputs", "mean_exit_loop_inputs"), ("executed loops", "executed_loops")]
  for h in hops:
    columns += [
      (f"acc {h} hops", f"{HOP_METRIC}{h}"),
      (f"exit {h} hops", f"{exit_report.HOPS_EXIT}{h}"),
    ]
  # a fixed K' runs K' loops for every token, in every pass
  ran = [compute, "mean_exit_loop_inputs", "executed_loops"]
  ran += [f"{exit_report.HOPS_EXIT}{h}" for h in hops]
  named = [
    (f"K'={k} (fixed)", {**m, **dict.fromkeys(ran, float(k))}) for k, m in sorted(fixed.items())
  ]
  named += [(key, e["metrics"]) for key, e in results.items()]
  width = max(len(name) for name, _ in named)
  cell = max(len(label) for label, _ in columns) + 2
  lines = [title, f"  {'':<{width}}" + "".join(f"{label:>{cell}}" for label, _ in columns)]
  for name, metrics in named:
    values = [metrics.get(metric) for _, metric in columns]
    lines.append(
      f"  {name:<{width}}" + "".join(" " * cell if v is None else f"{v:>{cell}.4f}" for v in values)
    )
  say("\n".join(lines))


def _jsonable(value):
  """JSON has no NaN or infinity (a centred accuracy of a one-example task, lm-eval's
  skipped stderr): non-finite floats are written as null."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, float | np.floating):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer | np.bool_):
    return value.item()
  return value if value is None or isinstance(value, str | int | bool) else str(value)


def write_task_results(workdir: str, family: str, step: int, loops: int, record: dict):
  """`<workdir>/<family>_step<N>_loops<K>.json` (family: core, lm_eval), written whole:
  one benchmark family's results of one checkpoint at one loop count."""
  path = epath.Path(workdir) / f"{family}_step{step}_loops{loops}.json"
  if jax.process_index() == 0:
    write_atomic(path, json.dumps(_jsonable(record), indent=1))
  return path


def print_task_table(title: str, rows: dict[str, dict[int, float]]) -> None:
  """A row per name, a column per K': `rows[name][K'] = value` (blank where missing)."""
  loops = sorted({k for row in rows.values() for k in row})
  width = max([len(name) for name in rows] + [4])
  lines = [title, f"  {'':<{width}}" + "".join(f"{f'K={k}':>10}" for k in loops)]
  for name, row in rows.items():
    cells = "".join(f"{row[k]:>10.4f}" if k in row else " " * 10 for k in loops)
    lines.append(f"  {name:<{width}}{cells}")
  say("\n".join(lines))
