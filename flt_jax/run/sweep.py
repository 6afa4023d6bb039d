"""A checkpoint evaluated: its params restored onto this machine's devices
(`restore_params` / `restore_checkpoint`, read-only, safe beside a live run), then swept
over loop counts K' (`sweep_checkpoint`, `evaluate_checkpoint`: test-time compute) on
the run's sharded evaluator."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from flt_jax import config as flt_config
from flt_jax.errors import config_error
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import multihost
from flt_jax.run import results as result_files
from flt_jax.run.program import resolve_config
from flt_jax.run.setup import RunSetup, setup
from flt_jax.train.checkpoint import Checkpointer

_MACHINE_FIELDS = parallel_config.MESH_AXES + parallel_config.DCN_FIELDS
_MACHINE_FIELDS += ("cpu_devices", "cpu_reuse_memory", "distributed")


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  """A checkpoint's params on this machine's mesh, with the config saved with them."""

  run_setup: RunSetup
  params: Any
  step: int
  saved_config: dict  # as saved with the step, before defaults or --config

  @property
  def trained_loops(self) -> int:
    """The loop count K it was trained at (the saved config's)."""
    saved = int((self.saved_config.get("model") or {}).get("loops", 0) or 0)
    return saved or self.run_setup.model_cfg.loops


def restore_checkpoint(
  workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> RestoredCheckpoint:
  """The params of a checkpoint of `workdir` (default: its latest), sharded over this
  run's mesh. With `config` None the config saved in that checkpoint is used, so a
  workdir alone is enough. Read-only: nothing in the workdir is created or changed, and
  the saved config and record are read once."""
  if config is None:
    mesh_config = parallel_config.get_config()
  else:
    config = resolve_config(config)
    mesh_config = config.mesh
  # Orbax starts JAX's backends: a host joins its cluster first.
  multihost.initialize(mesh_config)
  with Checkpointer(workdir, read_only=True) as checkpointer:
    step = checkpointer.step_to_read(step)
    saved = checkpointer.saved_config(step, required=True)
    if config is None:
      config = flt_config.with_defaults(saved)
      # The mesh describes the machine it ran on, not the model: lay the saved run's
      # state over this machine's devices (all on fsdp, JAX's CPU device count), whatever
      # mesh wrote it.
      for field in _MACHINE_FIELDS:
        config.mesh[field] = mesh_config[field]
    run_setup = setup(config, workdir, training=False)
    checkpointer.check_run(step, run_setup.config, run_setup.tokenizer.identity())
    checkpointer.check_param_shapes(step, run_setup.abstract_state.params)
    params = checkpointer.restore(step, run_setup.restore_target)["state"].params
  return RestoredCheckpoint(run_setup, params, step, saved)


def restore_params(
  workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> tuple[RunSetup, dict, int]:
  """(run setup, params, step) of `restore_checkpoint`."""
  restored = restore_checkpoint(workdir, config, step)
  return restored.run_setup, restored.params, restored.step


def hop_data_config(data_config, hops: int) -> ml_collections.ConfigDict:
  """config.data restricted to `hops` hops (hops_min = hops_max = hops), same task seed."""
  data = ml_collections.ConfigDict(data_config.to_dict())
  data.multihop.hops_min = data.multihop.hops_max = int(hops)
  return data


def fixed_curve(
  checkpoint: RestoredCheckpoint, loops_list: Sequence[int], *, per_loop: bool = False
) -> dict[int, dict]:
  """Loss, bpb and answer accuracy (per hop count on multihop) at each fixed K'; with
  per_loop, h_change too (how much the last loop still moves h, from the same forward)."""
  run_setup, params = checkpoint.run_setup, checkpoint.params
  results = run_setup.evaluator.sweep(params, run_setup.eval_batches, loops_list, per_loop=per_loop)
  if run_setup.config.data.source == "multihop":
    for k, per_hop in hop_sweep(run_setup, params, loops_list).items():
      results[k].update(per_hop)
  return results


def hop_sweep(run_setup: RunSetup, params, loops_list) -> dict[int, dict[str, float]]:
  """{K': {answer_accuracy_hops<h>: accuracy}} for every hop count h the run trained on,
  each on its own validation set (hop_data_config)."""
  m = run_setup.config.data.multihop
  out = {int(k): {} for k in loops_list}
  for hops in range(int(m.hops_min), int(m.hops_max) + 1):
    batches = functools.partial(
      run_setup.eval_batches, hop_data_config(run_setup.config.data, hops)
    )
    for k, metrics in run_setup.evaluator.sweep(params, batches, loops_list).items():
      out[k][f"{result_files.HOP_METRIC}{hops}"] = metrics["answer_accuracy"]
  return out


def eval_data_record(run_setup: RunSetup, saved: dict) -> tuple[str, dict]:
  """(file-name suffix, record) of the data a sweep evaluates on: '' for the run's own
  validation data, '_data-<hash>' for other data, so a sweep on another corpus writes
  under its own name instead of over the run's rows."""
  data = run_setup.config.data.to_dict()
  record = {
    "source": data["source"],
    "path": data["path"],
    "eval_steps": int(run_setup.config.train.eval_steps),
    "micro_batch_size": int(run_setup.config.train.micro_batch_size),
  }
  own = flt_config.with_defaults(saved).data.to_dict()
  if data == own:
    return "", record
  digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
  return f"_data-{digest[:8]}", record


def check_loops(loops_list) -> None:
  bad = [k for k in loops_list or [] if k < 1]
  if bad:
    raise config_error("--eval_loops", bad, "every loop count must be >= 1", "e.g. 1,2,4,12")


def evaluate_checkpoint(
  config: ml_collections.ConfigDict | None,
  workdir: str,
  loops_list: list[int] | None = None,
  step: int | None = None,
) -> dict[int, dict]:
  """Restores a checkpoint of workdir (default: the latest; `config` None: the config
  saved with it) and sweeps it over loop counts (sweep_checkpoint)."""
  check_loops(loops_list)
  return sweep_checkpoint(restore_checkpoint(workdir, config, step), workdir, loops_list)


def sweep_checkpoint(
  checkpoint: RestoredCheckpoint, workdir: str, loops_list: list[int] | None = None
) -> dict[int, dict]:
  """Evaluates a restored checkpoint at each loop count (test-time compute: params
  trained at K run at any K' >= 1; default: the trained K), with `h_change`, how much
  the last loop still moves h.

  Process 0 writes `<workdir>/eval_step<N>.json` (each K' added to what an earlier
  sweep of the same step wrote), `loop_sweep_step<N>.csv`/`.png`, and TensorBoard
  scalars under `tb/loop_sweep_step<N>` with K' as the x axis. On multihop data each
  trained hop count is also evaluated alone (`answer_accuracy_hops<h>`), written as the
  hops x K' table and heat map `hops_by_loops_step<N>.csv`/`.png`. Data other than the
  run's own validation data writes under `..._step<N>_data-<hash>` names, and every
  table records its data. Each file is written whole (a kill leaves the previous one)."""
  run_setup, step = checkpoint.run_setup, checkpoint.step
  trained_loops = checkpoint.trained_loops
  suffix, data_record = eval_data_record(run_setup, checkpoint.saved_config)
  table_path = epath.Path(workdir) / f"eval_step{step}{suffix}.json"
  earlier = result_files.read_sweep_table(table_path)  # a damaged table stops us before the work
  loops_list = sorted(set(loops_list or [trained_loops]))
  # per_loop: h_change, how much the last loop still moves h, from the same forward.
  results = fixed_curve(checkpoint, loops_list, per_loop=True)
  result_files.print_sweep(step, workdir, run_setup.model_cfg.variant, trained_loops, results)
  if jax.process_index() == 0:
    table = {"step": step, "trained_loops": trained_loops, "data": data_record, "loops": earlier}
    result_files.write_sweep(
      workdir, table_path, f"step{step}{suffix}", table, results, run_setup.config
    )
  return results
