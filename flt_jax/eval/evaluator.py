"""One sharded evaluator: every evaluation of a model (training's eval, the loop-count
sweep of a checkpoint, the CORE and lm-eval scorers) runs through it.

    evaluator = Evaluator(model, mesh, rules, param_shardings, rows=..., token_bytes_V=...)
    evaluator.metrics(params, host_batches, loops=12)         # loss, bpb, answer accuracy
    evaluator.sweep(params, make_batches, [1, 6, 12], per_loop=True)   # + h_change per K'
    evaluator.exit_metrics(params, host_batches, exit_rule)   # per-token exit (model/exit.py)
    score_fn = evaluator.score_fn(params, loops=12, max_len=1024)     # CORE / lm-eval

The steps (eval/step.py) are compiled once per (step, loop count, options) with the
params sharded as in training and the batch split over the batch's mesh axes, so a
checkpoint evaluates on any mesh and on several hosts. A new metric family is a sum in
eval/step.py (in `eval_step`, or under `per_loop` when it reads every loop's h) and its
division in `finish`; `totals` keeps the per-loop sums (h_change_K1) for callers that
want every loop rather than the last.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from flt_jax.eval import scorer
from flt_jax.eval import step as step_lib
from flt_jax.model.exit import ExitRule
from flt_jax.model.looped import LoopedTransformer
from flt_jax.parallel import sharding as sharding_lib


def finish(totals: dict) -> dict[str, float]:
  """Metrics from summed step outputs: loss (nats/token), tokens, bpb, answer_accuracy,
  h_change (the last loop's mean relative change of h; nan at one loop), and with
  per-token exit the compute: mean_exit_loop (the mean over target tokens of the loops
  each ran: what decoding them one at a time executes), mean_exit_loop_answers (over
  answer tokens), mean_exit_loop_inputs (over every input token) and executed_loops (the
  loop iterations the teacher-forced pass ran per batch: a loop runs while any token of
  the batch is active)."""
  tokens = float(totals.get("tokens", 0.0))
  if not tokens:
    raise ValueError(
      "the validation data produced no target tokens to evaluate on; "
      "check config.data (validation split too small?)"
    )
  out = {"loss": float(totals["nll"]) / tokens, "tokens": tokens}
  if totals.get("bytes"):
    out["bpb"] = float(totals["nll"]) / (math.log(2) * float(totals["bytes"]))
  if totals.get("answers"):
    out["answer_accuracy"] = float(totals["answers_correct"]) / float(totals["answers"])
  if "h_change_K1" in totals:
    per_loop_K1 = np.asarray(totals["h_change_K1"], np.float64) / tokens
    out["h_change"] = float(per_loop_K1[-1]) if per_loop_K1.size else math.nan
  if "exit_loops" in totals:  # per-token exit: the compute, as the figures say
    out["mean_exit_loop"] = float(totals["exit_loops"]) / tokens
    if totals.get("answer_tokens"):
      out["mean_exit_loop_answers"] = float(totals["exit_loops_answers"]) / float(
        totals["answer_tokens"]
      )
    out["mean_exit_loop_inputs"] = float(totals["exit_loops_inputs"]) / max(
      float(totals["input_tokens"]), 1.0
    )
    out["executed_loops"] = float(totals["loops_run"]) / max(float(totals["batches"]), 1.0)
  return out


def _summed(run_batch: Callable[[dict], dict], host_batches: Iterable[dict]) -> dict:
  """The sums run_batch returns for each host batch, added up in float64 on the host."""
  totals: dict = {}
  for batch in host_batches:
    for k, v in jax.device_get(run_batch(batch)).items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
  return totals


class Evaluator:
  """The evaluation programs of one model over one mesh. `rows` is the global batch of
  one call (a multiple of the batch's mesh shards); each host passes its share of the
  metric batches and the same scoring pairs."""

  def __init__(
    self,
    model: LoopedTransformer,
    mesh: Mesh,
    rules,
    param_shardings,
    *,
    rows: int,
    token_bytes_V,
  ):
    self.model = model
    self.mesh, self.rules, self.param_shardings = mesh, rules, param_shardings
    self.batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    self.rows = int(rows)
    self._check_rows(self.rows)
    self.token_bytes_V = np.asarray(token_bytes_V, np.int32)  # bytes per token, for bpb
    self._keys = step_lib.batch_keys(model.cfg)
    self._compiled: dict = {}

  def _check_rows(self, rows: int) -> None:
    shards = sharding_lib.batch_shards(self.mesh, self.rules)
    if rows < 1 or rows % shards:
      raise ValueError(
        f"{rows} rows per evaluation call do not split over the {shards} batch shards of "
        f"the mesh; use a positive multiple of {shards}"
      )

  # ------------------------------------------------------------------- compiled steps

  def eval_step(self, loops: int, per_loop: bool = False) -> Callable:
    """(params, global batch, token_bytes_V) -> sums (replicated), at `loops` loops."""
    key = ("eval", int(loops), bool(per_loop))
    if key not in self._compiled:
      self._compiled[key] = sharding_lib.jit_eval_step(
        functools.partial(
          step_lib.eval_step, model=self.model, loops=int(loops), per_loop=bool(per_loop)
        ),
        self.mesh,
        self.rules,
        self.param_shardings,
        self.batch_sharding,
      )
    return self._compiled[key]

  def exit_step(self, rule: ExitRule) -> Callable:
    """(params, global batch, token_bytes_V, threshold) -> exit_eval_step's sums; one
    program per criterion and loop bounds (the threshold is an argument)."""
    rule = dataclasses.replace(rule, threshold=0.0)
    key = ("exit", rule)
    if key not in self._compiled:
      replicated = sharding_lib.replicated(self.mesh)
      self._compiled[key] = sharding_lib.sharded_jit(
        functools.partial(step_lib.exit_eval_step, model=self.model, rule=rule),
        self.mesh,
        self.rules,
        in_shardings=(self.param_shardings, self.batch_sharding, replicated, replicated),
        out_shardings=replicated,
      )
    return self._compiled[key]

  def score_step(self, loops: int) -> Callable:
    """(params, global {inputs, targets, mask}) -> (sum_logprob_B, all_greedy_B)."""
    key = ("score", int(loops))
    if key not in self._compiled:
      self._compiled[key] = sharding_lib.sharded_jit(
        functools.partial(step_lib.score_step, model=self.model, loops=int(loops)),
        self.mesh,
        self.rules,
        in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=sharding_lib.replicated(self.mesh),
      )
    return self._compiled[key]

  # ------------------------------------------------------------------- metrics

  def global_batch(self, host_batch: dict, keys: Sequence[str] | None = None) -> dict:
    """This host's share of `rows` sequences as global arrays (only what eval_step, or
    the step reading `keys`, reads)."""
    keys = self._keys if keys is None else keys
    return sharding_lib.make_global_batch(
      {k: host_batch[k] for k in keys if k in host_batch}, self.batch_sharding, self.rows
    )

  def totals(
    self, params, host_batches: Iterable[dict], loops: int, *, per_loop: bool = False
  ) -> dict:
    """eval_step's sums over `host_batches` (a finite iterable of this host's numpy
    batches), added up in float64 on the host."""
    step = self.eval_step(loops, per_loop)
    return _summed(
      lambda batch: step(params, self.global_batch(batch), self.token_bytes_V), host_batches
    )

  def metrics(
    self, params, host_batches: Iterable[dict], loops: int, *, per_loop: bool = False
  ) -> dict[str, float]:
    """Loss, bpb and answer accuracy over `host_batches` at `loops` loops; `per_loop`
    adds h_change (it keeps every loop's h: K' x the activations of one batch)."""
    return finish(self.totals(params, host_batches, loops, per_loop=per_loop))

  def exit_metrics(self, params, host_batches: Iterable[dict], rule: ExitRule) -> dict[str, float]:
    """metrics() with per-token exit by `rule` (at most rule.max_loops loops), plus the
    compute it took (mean_exit_loop, ..., executed_loops: see finish)."""
    step = self.exit_step(rule)
    keys = step_lib.exit_batch_keys(self.model.cfg)
    threshold = np.float32(rule.threshold)
    totals = _summed(
      lambda batch: step(params, self.global_batch(batch, keys), self.token_bytes_V, threshold),
      host_batches,
    )
    return finish(totals)

  def sweep(
    self,
    params,
    make_batches: Callable[[], Iterable[dict]],
    loops_list: Sequence[int],
    *,
    per_loop: bool = False,
  ) -> dict[int, dict[str, float]]:
    """metrics() at each K' of loops_list; make_batches() gives a fresh pass each time."""
    return {
      int(k): self.metrics(params, make_batches(), int(k), per_loop=per_loop) for k in loops_list
    }

  # ------------------------------------------------------------------- scoring

  def score_fn(
    self,
    params,
    loops: int,
    max_len: int,
    *,
    rows: int | None = None,
    pad_id: int = 0,
    min_bucket: int = 16,
  ) -> scorer.ScoreFn:
    """A ScoreFn (eval/scorer.py) on the sharded score step at `loops` loops: contexts
    left-truncated to `max_len` input tokens, `rows` rows per call (default the
    evaluator's). On several hosts every host must pass the same pairs."""
    rope_len = self.model.cfg.rope_table_len
    if max_len > rope_len:
      raise ValueError(
        f"max_len={max_len} exceeds the model's rotary table ({rope_len} positions); "
        "lower max_len or raise config.model.rope_max_len"
      )
    rows = self.rows if rows is None else int(rows)
    self._check_rows(rows)
    step = self.score_step(loops)

    def score_rows(inputs_BxT, targets_BxT, mask_BxT):
      batch = {
        name: jax.make_array_from_callback(a.shape, self.batch_sharding, lambda i, a=a: a[i])
        for name, a in (("inputs", inputs_BxT), ("targets", targets_BxT), ("mask", mask_BxT))
      }
      sum_logprob_B, all_greedy_B = jax.device_get(step(params, batch))
      return np.asarray(sum_logprob_B), np.asarray(all_greedy_B)

    return scorer.make_score_fn(
      score_rows, max_len, rows=rows, pad_id=pad_id, min_bucket=min_bucket
    )
