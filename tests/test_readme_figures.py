"""benchmarks/readme_figures.py: what it reads from the commands' outputs, and the claims it
checks (the README's, with tolerances) pass on the README's figures and fail when a
figure breaks them. The runs themselves are the benchmark's (minutes each)."""

import json
import re

import pytest

from benchmarks import readme_figures as rf
from flt_jax import study
from flt_jax.eval import sweep_report

TRAIN_OUTPUT = """\
devices: data=2 fsdp=1 tensor=1 (2 devices, cpu) in 1 process(es) | per-device batch 4
FLT_12loop: FLT K=12 L=2 d=128 vocab=257 | 475,136 params | 300 steps x 1,024 tokens
step 1/300 | loss 5.5456 | 137 tok/s | MFU 2.9% | ETA --
step 10/300 | loss 2.7722 | 830 tok/s | MFU 17.3% | ETA 5m58s
step 20/300 | loss 2.5000 | 1,900 tok/s | MFU 40.0% | ETA 2m00s
step 100/300 | loss 2.1000 | 2,000 tok/s | MFU 41.0% | ETA 1m40s
eval @ 100: loss 1.9919 bpb 2.8742
step 110/300 | loss 2.0000 | 860 tok/s | MFU 18.0% | ETA 1m40s
step 120/300 | loss 1.9000 | 2,100 tok/s | MFU 43.0% | ETA 1m30s
step 300/300 | loss 1.5041 | 2,028 tok/s | MFU 42.2% | ETA 0s
eval @ 300: loss 1.7745 bpb 2.5605
done 300/300 steps | final loss 1.5041 | 307,200 tokens | time 3m06s | 1,651 tok/s
"""

# The README's earlier multihop figures (another 2-core machine; WORKSPACE.md keeps
# them): FLT's hops x K' table, and LT's accuracy as its sentence gave it (0.26-0.35 at
# K' = 1-4, 0.49 at 8, 1.00 at 12, 0.70 at 16, 0.62 at 24; K' = 2, 3 inside that range).
README_HOPS = {
  1: (0.27, 0.62, 0.93, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00),
  2: (0.45, 0.57, 0.75, 0.95, 0.96, 0.98, 1.00, 0.98, 0.98),
  3: (0.50, 0.68, 0.83, 0.97, 0.99, 1.00, 1.00, 0.98, 0.98),
}
README_LT = {1: 0.26, 2: 0.30, 3: 0.33, 4: 0.35, 8: 0.49, 12: 1.00, 16: 0.70, 24: 0.62}


def _flt_sweep(hops=README_HOPS):
  """The sweep's results; h_change as the sentence gave it (7% at K'=12, 5% at 24)."""
  out = {}
  for i, k in enumerate(rf.SWEEP_LOOPS):
    per_hop = {f"answer_accuracy_hops{h}": row[i] for h, row in hops.items()}
    accuracy = sum(per_hop.values()) / len(per_hop)
    change = float("nan") if k == 1 else 0.07 if k == 12 else 0.05
    out[k] = {"answer_accuracy": accuracy, "h_change": change, **per_hop}
  return out


def _lt_sweep():
  return {
    k: {"answer_accuracy": a, "h_change": float("nan") if k == 1 else 0.28 if k == 12 else 0.12}
    for k, a in README_LT.items()
  }


def test_train_output_is_read_as_the_readme_shows_it():
  progress = rf.progress_lines(TRAIN_OUTPUT)
  assert [p[:3] for p in progress[:2]] == [(1, 5.5456, 137), (10, 2.7722, 830)]
  assert rf.eval_losses(TRAIN_OUTPUT) == {100: 1.9919, 300: 1.7745}
  excerpt = rf.readme_excerpt(TRAIN_OUTPUT, (1, 10, 300))
  assert excerpt[2:5] == [progress[0][3], progress[1][3], "..."]
  assert excerpt[-3:] == [progress[-1][3], "eval @ 300: loss 1.7745 bpb 2.5605", excerpt[-1]]
  assert excerpt.count("...") == 2
  steady, paused = rf.steady_tokens_per_s(progress, log_every=10, pause_every=(100,))
  assert steady == [1900, 2000, 2100, 2028] and paused == [(110, 860)]
  assert all(ok for _, ok, _ in rf.train_claims(progress, rf.eval_losses(TRAIN_OUTPUT), 257))


def test_a_loss_that_rises_fails_the_train_claims():
  rising = TRAIN_OUTPUT.replace("step 300/300 | loss 1.5041", "step 300/300 | loss 5.9000")
  checks = rf.train_claims(rf.progress_lines(rising), rf.eval_losses(rising), 257)
  assert [ok for _, ok, _ in checks] == [True, False, True]
  checks = rf.train_claims(rf.progress_lines(TRAIN_OUTPUT), rf.eval_losses(TRAIN_OUTPUT), 300)
  assert [ok for _, ok, _ in checks] == [False, True, True]  # ln 300 = 5.70


def test_the_sweep_table_the_run_writes_is_read_back(tmp_path):
  path = tmp_path / "eval_step1000.json"
  loops = {str(k): {"answer_accuracy": 0.5, "h_change": None if k == 1 else 0.1} for k in (1, 2)}
  path.write_text(json.dumps({"step": 1000, "trained_loops": 12, "loops": loops}))
  table = rf.read_sweep_table(path)
  assert table[2] == {"answer_accuracy": 0.5, "h_change": 0.1}
  assert table[1]["h_change"] != table[1]["h_change"]  # nan


def test_the_hop_table_matches_the_one_the_eval_writes(tmp_path):
  sweep = _flt_sweep()
  hops = rf.hop_table(sweep)
  sweep_report.write_hop_table(hops, tmp_path / "hops.csv")
  assert sweep_report.read_hop_table(tmp_path / "hops.csv") == hops
  table = rf.markdown_hop_table(hops)
  assert table.splitlines()[0].startswith("| hops | K'=1 | 2 | 3 |")
  assert table.splitlines()[2] == "| 1 | " + " | ".join(f"{a:.2f}" for a in README_HOPS[1]) + " |"


def test_the_readme_multihop_figures_pass_the_multihop_claims():
  checks = rf.multihop_claims(_flt_sweep(), _lt_sweep())
  assert len(checks) == 7 and all(ok for _, ok, _ in checks), checks


@pytest.mark.parametrize(
  "hop, k, value, failing",
  [
    (1, 1, 0.60, ["FLT at K'=1: 1 hop within 0.15 of chance"]),
    (3, 1, 0.80, ["FLT at K'=1: more hops no better than copying the query node + 0.15"]),
    (2, 4, 0.70, ["FLT from K'=4 on: every hop count >= 0.9"]),
    (
      3,
      24,
      0.50,
      [
        "FLT from K'=4 on: every hop count >= 0.9",
        "FLT past the trained K: within 0.05 of its accuracy at K",
      ],
    ),
  ],
)
def test_a_broken_multihop_figure_fails_its_claim(hop, k, value, failing):
  hops = {h: list(row) for h, row in README_HOPS.items()}
  hops[hop][rf.SWEEP_LOOPS.index(k)] = value
  failed = [name for name, ok, _ in rf.multihop_claims(_flt_sweep(hops), _lt_sweep()) if not ok]
  assert failed == failing


def test_lt_right_everywhere_fails_the_lt_claims():
  lt = {k: {"answer_accuracy": 1.0, "h_change": 0.01} for k in rf.SWEEP_LOOPS}
  failed = [name for name, ok, _ in rf.multihop_claims(_flt_sweep(), lt) if not ok]
  assert failed == [
    "LT at K' <= 4: at least 0.3 below its trained K",
    "past the trained K, LT's last loop moves h more than FLT's",
  ]


def _summary(tmp_path, residual):
  rows = [
    {
      "run": run,
      "final_train_loss": 1.6,
      "final_val_loss": 1.8,
      "max_residual_norm": r,
      "max_grad_norm": 1.0,
      "diverged": "no",
    }
    for run, r in residual.items()
  ]
  study.write_summary(tmp_path, rows)  # the study's own writer
  return rf.read_summary((tmp_path / "summary.csv").read_text())


def test_the_readme_study_figures_pass_the_study_claims(tmp_path):
  summary = _summary(tmp_path, {"lt_12loop": 215.0, "lt_i_12loop": 44.64, "flt_12loop": 43.4})
  assert all(ok for _, ok, _ in rf.study_claims(summary))
  flat = _summary(tmp_path, {"lt_12loop": 60.0, "lt_i_12loop": 44.64, "flt_12loop": 43.4})
  assert [ok for _, ok, _ in rf.study_claims(flat)] == [False, True, True]


def test_the_aot_report_is_checked_for_fit():
  line = "  total           5.02 GiB of 16.00 GiB HBM: fits (31.4%)"
  assert rf.aot_claims(f"head\n{line}\n")[0][1]
  assert not rf.aot_claims(line.replace("fits", "DOES NOT FIT"))[0][1]


def test_the_machine_is_described():
  line = rf.machine_description()
  assert "cores usable" in line and "Python " in line and "jax " in line and "commit" in line


# ----------------------------------------------------------------------------- README.md

README = (rf.REPO / "README.md").read_text()


def _table_rows(first_cell_pattern: str) -> dict[str, list[str]]:
  """{first cell: other cells} of README.md's table rows whose first cell matches; the
  first such row wins (the fixed-K multihop table comes before the random-K one, whose
  rows start with the same hop counts)."""
  rows = {}
  for line in README.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and re.fullmatch(first_cell_pattern, cells[0]):
      rows.setdefault(cells[0], cells[1:])
  return rows


def _number(cell: str) -> float:
  return float("nan") if cell == "-" else float(cell)


def test_the_figures_in_the_readme_pass_their_claims(tmp_path):
  hops = {int(h): [_number(c) for c in row] for h, row in _table_rows(r"[123]").items()}
  assert sorted(hops) == [1, 2, 3] and all(len(row) == len(rf.SWEEP_LOOPS) for row in hops.values())
  loops = _table_rows(r"(FLT|LT) (accuracy|h_change)")
  sweep = {}
  for variant in ("FLT", "LT"):
    sweep[variant] = {
      k: {
        "answer_accuracy": _number(loops[f"{variant} accuracy"][i]),
        "h_change": _number(loops[f"{variant} h_change"][i]),
      }
      for i, k in enumerate(rf.SWEEP_LOOPS)
    }
  for i, k in enumerate(rf.SWEEP_LOOPS):
    sweep["FLT"][k].update({f"answer_accuracy_hops{h}": row[i] for h, row in hops.items()})
  checks = rf.multihop_claims(sweep["FLT"], sweep["LT"])
  assert all(ok for _, ok, _ in checks), checks
  study_rows = _table_rows(r"(lt|lt_i|flt)_12loop")
  summary = _summary(tmp_path, {run: float(row[2]) for run, row in study_rows.items()})
  for run, row in study_rows.items():
    summary[run]["diverged"] = row[4]
  assert all(ok for _, ok, _ in rf.study_claims(summary))
