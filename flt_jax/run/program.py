"""The program a config describes, built without data: the one builder that training,
evaluation and ahead-of-time compilation (`flt_jax.aot`) share.

  resolve_config(config)                every key present and every section valid
  build_program(config, vocab, devices) model, optimizer, abstract state, mesh, rules,
                                        shardings, the jitted train step and the
                                        sharded evaluator

`build_program` reads no data and touches no workdir: the vocabulary is given (the
tokenizer's, or a size for AOT), and `devices` (default: every device of every process)
may be compile-only devices of a TPU or GPU topology, so the step that trains is the
step `flt_jax.aot` compiles.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flt_jax import config as flt_config
from flt_jax.data import config as data_config_lib
from flt_jax.eval.evaluator import Evaluator
from flt_jax.model import config as model_config_lib
from flt_jax.model.looped import LoopedTransformer
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import sharding as sharding_lib
from flt_jax.train import config as train_config_lib
from flt_jax.train import optimizer as optim_lib
from flt_jax.train import state as state_lib
from flt_jax.train import step as step_lib


def resolve_config(config: ml_collections.ConfigDict, check_data: bool = True):
  """A copy of `config` with every key checked and every section validated (the data
  section only with `check_data`: a program is built without data).

  Raises ConfigError (a ValueError) naming the field and the fix; nothing is written
  before this passes.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  flt_config.check_keys(config)
  model_config_lib.validate(config.model)
  if check_data:
    data_config_lib.validate(config.data, seq_len=config.model.seq_len)
  train_config_lib.validate(config)
  parallel_config.validate(config.mesh)
  return config


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything the train and eval steps are made of, over one mesh."""

  config: ml_collections.ConfigDict  # resolved; model.vocab_size is the model's
  model_cfg: model_config_lib.ModelConfig
  model: LoopedTransformer
  optimizer: optax.GradientTransformation
  # The train state as ShapeDtypeStructs; params keep their Flax nn.Partitioned boxes
  # (logical axis names) so shardings can be derived with nn.logical_to_mesh_sharding.
  abstract_state_boxed: state_lib.TrainState
  mesh: jax.sharding.Mesh  # axes (data, fsdp, tensor)
  rules: tuple  # logical axis name -> mesh axes (config.mesh.rules)
  state_shardings: state_lib.TrainState  # a NamedSharding per leaf of the unboxed state
  batch_sharding: jax.sharding.NamedSharding  # [B, T] batches: B over data x fsdp
  num_micro: int  # micro-batches per optimizer step
  total_steps: int
  n_params: dict[str, int]

  @property
  def abstract_state(self) -> state_lib.TrainState:
    """The abstract state without boxes: the structure of the real one."""
    return nn.meta.unbox(self.abstract_state_boxed)

  @property
  def global_batch_size(self) -> int:
    """Sequences per optimizer step (all micro-batches, all hosts)."""
    return self.config.train.micro_batch_size * self.num_micro

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.model_cfg.seq_len

  @property
  def restore_target(self) -> state_lib.TrainState:
    """The abstract state carrying this mesh's shardings: Orbax restores onto it, so a
    checkpoint written on another mesh (8 devices) lands sharded on this one (4, 1)."""
    return sharding_lib.with_shardings(self.abstract_state_boxed, self.state_shardings)

  def init_fn(self, rng) -> state_lib.TrainState:
    """The pure initialisation: rng -> a fresh train state (unsharded)."""
    return state_lib.create_train_state(self.model, self.optimizer, rng, self.model_cfg.seq_len)

  def step_fn(self, diagnostics: bool = False):
    """The pure train step: (state, batch) -> (state, metrics), before any jit."""
    return functools.partial(
      step_lib.train_step,
      model=self.model,
      optimizer=self.optimizer,
      num_micro=self.num_micro,
      diagnostics=bool(diagnostics),
      max_consecutive_nonfinite=self.config.train.max_consecutive_nonfinite,
      loop_seed=self.config.train.seed,  # random loop counts: a function of (seed, step)
    )

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, born sharded (jit with out_shardings: no full copy on one device)."""
    return sharding_lib.create_sharded(
      self.init_fn,
      self.mesh,
      self.rules,
      self.state_shardings,
      jax.random.PRNGKey(self.config.train.seed),
    )

  @functools.cached_property
  def _steps(self) -> dict:
    return {}

  def train_step(self, diagnostics: bool = False):
    """The jitted `train_step`: (state, global batch) -> (state, metrics), the state
    sharded as `state_shardings` and donated, the batch split over data x fsdp, the
    metrics replicated. `diagnostics` adds per-loop losses and per-layer gradient norms.
    Built once per program and flag."""
    key = ("train", bool(diagnostics))
    if key not in self._steps:
      self._steps[key] = sharding_lib.jit_train_step(
        self.step_fn(diagnostics),
        self.mesh,
        self.rules,
        self.state_shardings,
        self.batch_sharding,
        num_micro=self.num_micro,
      )
    return self._steps[key]

  def compile_train_step(self, diagnostics: bool = False):
    """`train_step(diagnostics)` lowered on `abstract_train_args` and compiled: the
    executable the train loop calls (and whose memory analysis `run/fits.py` checks
    before a run starts)."""
    return self.train_step(diagnostics).lower(*self.abstract_train_args()).compile()

  def make_evaluator(self, token_bytes_V) -> Evaluator:
    """The sharded evaluator (loss, bpb, answer accuracy, h_change, scoring) over this
    mesh, the params sharded as in training, `micro_batch_size` rows per call;
    `token_bytes_V` gives bits per byte (the tokenizer's bytes per token)."""
    return Evaluator(
      self.model,
      self.mesh,
      self.rules,
      self.state_shardings.params,
      rows=self.config.train.micro_batch_size,
      token_bytes_V=token_bytes_V,
    )

  def abstract_train_args(self) -> tuple:
    """(state, batch) as sharded ShapeDtypeStructs: what `train_step(...).lower` takes."""
    tokens = jax.ShapeDtypeStruct(
      (self.global_batch_size, self.model_cfg.seq_len), jnp.int32, sharding=self.batch_sharding
    )
    batch = {key: tokens for key in step_lib.batch_keys(self.model_cfg)}
    return self.restore_target, batch


def build_program(config: ml_collections.ConfigDict, vocab_size: int | None, devices=None):
  """The Program of `config` over `devices` (default: every device of every process).

  `vocab_size` is the tokenizer's; it is used when `config.model.vocab_size` is 0, and
  the resolved size is written into the program's config. Every mismatch (mesh sizes,
  an indivisible batch or dimension) is a ConfigError here, before anything is written.
  """
  config = resolve_config(config, check_data=False)  # run.setup checked it with the data
  model_cfg = model_config_lib.ModelConfig.from_config(config.model, vocab_size)
  config.model.vocab_size = model_cfg.vocab_size
  # The devices the program is compiled for pick the attention kernels, whatever the host.
  model_cfg = model_cfg.for_devices(jax.devices() if devices is None else devices)
  num_micro = train_config_lib.grad_accum_steps(config)
  global_batch = config.train.micro_batch_size * num_micro
  model = LoopedTransformer(model_cfg)
  rng = jax.random.PRNGKey(config.train.seed)
  boxed_params = state_lib.abstract_params(model, rng, model_cfg.seq_len)
  n_params = state_lib.count_params(nn.meta.unbox(boxed_params))
  total_steps = optim_lib.resolve_total_steps(
    config.train, n_params["total"], global_batch * model_cfg.seq_len
  )
  optimizer = optim_lib.make_optimizer(
    config.optim, d_model=model_cfg.d_model, total_steps=total_steps
  )
  abstract_state_boxed = state_lib.abstract_train_state(boxed_params, optimizer)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_rules(config.mesh)
  sharding_lib.check_batch(global_batch, config.train.micro_batch_size, mesh, rules)
  return Program(
    config=config,
    model_cfg=model_cfg,
    model=model,
    optimizer=optimizer,
    abstract_state_boxed=abstract_state_boxed,
    mesh=mesh,
    rules=rules,
    state_shardings=sharding_lib.state_shardings(abstract_state_boxed, mesh, rules),
    batch_sharding=sharding_lib.batch_sharding(mesh, rules),
    num_micro=num_micro,
    total_steps=total_steps,
    n_params=n_params,
  )
