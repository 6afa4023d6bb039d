"""train_and_evaluate(config, workdir): the training loop, and checkpoint evaluation."""

from __future__ import annotations

import functools
import json
import time

import jax
import ml_collections
import numpy as np

from flt_jax import config as flt_config
from flt_jax.data import config as data_config_lib
from flt_jax.data import pipeline as data_pipeline
from flt_jax.eval import evaluate as eval_lib
from flt_jax.model import config as model_config_lib
from flt_jax.model.looped import LoopedTransformer
from flt_jax.train import checkpoint as ckpt_lib
from flt_jax.train import config as train_config_lib
from flt_jax.train import metrics as metrics_lib
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
  pass


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def resolve_config(config: ml_collections.ConfigDict):
  """Validates every section and fills model.vocab_size from the tokenizer.

  Raises ValueError on bad input before anything is written.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  flt_config.check_keys(config)
  model_config_lib.validate(config.model)
  data_config_lib.validate(config.data, seq_len=config.model.seq_len)
  train_config_lib.validate(config)
  return config


def _resolve_vocab(config, vocab_size: int) -> model_config_lib.ModelConfig:
  model_cfg = model_config_lib.ModelConfig.from_config(config.model, vocab_size)
  config.model.vocab_size = model_cfg.vocab_size  # saved with checkpoints for shape checks
  return model_cfg


def _pipeline(config, split: str, batch_size: int, **kwargs):
  return data_pipeline.make_pipeline(
    config.data,
    split=split,
    seq_len=config.model.seq_len,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    **kwargs,
  )


def _per_host(global_batch: int, what: str) -> int:
  if global_batch % jax.process_count():
    raise ValueError(
      f"{what}={global_batch} sequences do not divide over "
      f"{jax.process_count()} hosts; make it a multiple of the host count"
    )
  return global_batch // jax.process_count()


def _data_args(make_args, iterator):
  """The data iterator's state as an extra checkpoint item."""
  return {"data": make_args(iterator)}


def step_scalars(metrics) -> dict[str, float]:
  """TensorBoard names for a diagnostics train step's metrics (numpy values)."""
  out = {"train/loss": float(metrics["loss"]), "train/grad_norm": float(metrics["grad_norm"])}
  out.update({f"loops/loss_{k}": float(v) for k, v in enumerate(metrics["loop_loss"])})
  out.update({f"loops/residual_norm_{k}": float(v) for k, v in enumerate(metrics["residual_norm"])})
  out.update({f"grads/layer_{l}": float(v) for l, v in enumerate(metrics["layer_grad_norm"])})
  return out


def _eval_batches(config, batch_size, tokenizer=None):
  # A fixed batch count keeps every host in step (padding batches carry no targets).
  return _pipeline(
    config,
    "validation",
    batch_size,
    num_epochs=1,
    num_batches=config.train.eval_steps,
    tokenizer=tokenizer,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final metrics."""
  config = resolve_config(config)
  num_micro = train_config_lib.grad_accum_steps(config)
  global_batch = config.train.micro_batch_size * num_micro
  train_pipe = _pipeline(config, "train", _per_host(global_batch, "global batch"))
  model_cfg = _resolve_vocab(config, train_pipe.vocab_size)
  token_bytes_V = np.asarray(train_pipe.tokenizer.token_bytes, np.int32)
  model = LoopedTransformer(model_cfg)

  # Refuses an unwritable workdir, or one whose saved model shape differs.
  checkpointer = ckpt_lib.Checkpointer.from_config(workdir, config)
  latest = checkpointer.latest_step()

  rng = jax.random.PRNGKey(config.train.seed)
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, rng, config.model.seq_len))
  n_params = state_lib.count_params(abstract_params)
  tokens_per_step = global_batch * config.model.seq_len
  total_steps = optim_lib.resolve_total_steps(config.train, n_params["total"], tokens_per_step)
  optimizer = optim_lib.make_optimizer(
    config.optim, d_model=model_cfg.d_model, total_steps=total_steps
  )
  train_iter = iter(train_pipe)
  if latest is None:
    state = state_lib.create_train_state(model, optimizer, rng, config.model.seq_len)
    start = 0
  else:
    abstract_state = jax.eval_shape(
      lambda: state_lib.create_train_state(model, optimizer, rng, config.model.seq_len)
    )
    state = checkpointer.restore(
      latest, abstract_state, _data_args(data_pipeline.checkpoint_args_restore, train_iter)
    )["state"]
    start = int(state.step)
    _say(f"resumed from {checkpointer.directory} at step {start}")

  make_step = lambda diag: jax.jit(
    functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer, num_micro=num_micro, diagnostics=diag
    ),
    donate_argnums=0,
  )
  train_step, train_step_diag = make_step(False), make_step(True)
  eval_fn = eval_lib.make_eval_fn(model)
  eval_batch = _per_host(config.train.micro_batch_size, "train.micro_batch_size")

  def run_eval():
    batches = _eval_batches(config, eval_batch, train_pipe.tokenizer)
    return eval_lib.evaluate(eval_fn, state.params, batches, token_bytes_V, loops=model_cfg.loops)

  peak = metrics_lib.peak_flops_per_device(
    jax.devices()[0].platform, jax.devices()[0].device_kind, config.metrics.peak_flops_per_device
  )
  flops_per_token = metrics_lib.flops_per_token(model_cfg)
  writer = metrics_lib.MetricsWriter(workdir, config.metrics.tensorboard, jsonl=True)
  console = metrics_lib.ConsoleLogger(total_steps, print_fn=_say)
  _say(
    f"{config.experiment or model_cfg.variant}: {model_cfg.variant} K={model_cfg.loops} "
    f"L={model_cfg.n_layer} d={model_cfg.d_model} vocab={model_cfg.vocab_size} | "
    f"{n_params['total']:,} params ({n_params['non_embedding']:,} non-embedding) | "
    f"{total_steps} steps x {tokens_per_step:,} tokens ({num_micro} micro-batches)"
  )

  save_data = lambda: _data_args(data_pipeline.checkpoint_args_save, train_iter)
  first_loss = last_loss = None
  eval_metrics: dict = {}
  t_last, step_last = time.time(), start
  with ckpt_lib.PreemptionHandler() as preemption:
    step = start
    while step < total_steps:
      batch = next(train_iter)
      log_now = (step + 1) % config.train.log_every == 0 or step + 1 == total_steps or step == start
      fn = train_step_diag if log_now else train_step
      state, m = fn(state, {"inputs": batch["inputs"], "targets": batch["targets"]})
      step = int(state.step)
      in_a_row = int(state.nonfinite_in_a_row)
      if in_a_row:
        _say(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row)")
        if in_a_row >= config.train.max_consecutive_nonfinite:
          checkpointer.wait_until_finished()
          raise NonFiniteError(
            f"{in_a_row} consecutive non-finite updates at step {step}; stopping. The "
            f"last good checkpoint in {checkpointer.directory} is intact. Lower "
            "optim.matrix_lr/embedding_lr, set optim.grad_clip, or try model.dtype=float32."
          )
        continue
      if log_now:
        m = jax.device_get(m)
        now = time.time()
        tok_s = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        mfu = metrics_lib.compute_mfu(tok_s, flops_per_token, jax.device_count(), peak)
        last_loss = float(m["loss"])
        first_loss = last_loss if first_loss is None else first_loss
        scalars = {
          **step_scalars(m),
          "perf/tokens_per_s": tok_s,
          "train/nonfinite_total": int(state.nonfinite_total),
          **optim_lib.current_learning_rates(config.optim, model_cfg.d_model, step, total_steps),
        }
        if mfu is not None:
          scalars["perf/mfu"] = mfu
        writer.write_scalars(step, scalars)
        console.log(step, last_loss, tok_s, mfu)
      if config.train.eval_every and (step % config.train.eval_every == 0 or step == total_steps):
        eval_metrics = run_eval()
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        _say(
          f"eval @ {step}: "
          + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if k != "tokens")
        )
      # The checkpointer saves at multiples of checkpoint.every_steps; force the last.
      checkpointer.save(step, state, save_data(), force=step == total_steps)
      if preemption.should_stop(step):
        checkpointer.save(step, state, save_data(), force=True)
        checkpointer.wait_until_finished()
        _say(
          f"preempted: saved step {step} to {checkpointer.directory}; rerun the same "
          "command to resume"
        )
        writer.close()
        checkpointer.close()
        return {"step": step, "preempted": True}
  checkpointer.close()
  writer.close()
  summary = {
    "step": step,
    "first_loss": first_loss,
    "final_loss": last_loss,
    **{f"eval_{k}": v for k, v in eval_metrics.items()},
  }
  console.summary(
    step,
    last_loss if last_loss is not None else float("nan"),
    (step - start) * tokens_per_step,
    extra={f"eval_{k}": v for k, v in eval_metrics.items() if k != "tokens"},
  )
  return summary


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, loops_list: list[int] | None = None
) -> dict[int, dict]:
  """Restores workdir's latest checkpoint and evaluates it at each loop count
  (test-time compute: params trained at K run at any K' >= 1)."""
  config = resolve_config(config)
  loops_list = list(loops_list or [config.model.loops])
  bad = [k for k in loops_list if k < 1]
  if bad:
    raise ValueError(f"--eval_loops has {bad}; every loop count must be >= 1")
  eval_batch = _per_host(config.train.micro_batch_size, "train.micro_batch_size")
  first = _eval_batches(config, eval_batch)
  make_batches = lambda: _eval_batches(config, eval_batch, first.tokenizer)
  model_cfg = _resolve_vocab(config, first.vocab_size)
  checkpointer = ckpt_lib.Checkpointer.from_config(workdir, config)
  latest = checkpointer.latest_step()
  if latest is None:
    raise ValueError(
      f"no checkpoint in {checkpointer.directory}; train first with "
      "--mode=train and the same --config and --workdir"
    )
  model = LoopedTransformer(model_cfg)
  optimizer = optim_lib.make_optimizer(config.optim, d_model=model_cfg.d_model, total_steps=1)
  abstract_state = jax.eval_shape(
    lambda: state_lib.create_train_state(
      model, optimizer, jax.random.PRNGKey(0), config.model.seq_len
    )
  )
  params = checkpointer.restore(latest, abstract_state)["state"].params
  checkpointer.close()
  token_bytes_V = np.asarray(first.tokenizer.token_bytes, np.int32)
  results = eval_lib.loop_sweep(
    eval_lib.make_eval_fn(model), params, make_batches, token_bytes_V, loops_list
  )
  _say(
    f"checkpoint step {latest} of {workdir} ({model_cfg.variant}, trained at K={model_cfg.loops}):"
  )
  for k, m in results.items():
    _say(
      f"  loops {k:3d}: "
      + " | ".join(f"{name} {v:.4f}" for name, v in m.items() if name != "tokens")
    )
  if jax.process_index() == 0:
    with open(f"{workdir.rstrip('/')}/eval_step{latest}.json", "w") as f:
      json.dump({"step": latest, "loops": {str(k): v for k, v in results.items()}}, f, indent=1)
  return results
