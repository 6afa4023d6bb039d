"""A run's assembly: the program of its config (run/program.py) plus what the data gives
it (tokenizer, vocabulary, pipelines), and the workdir's checkpoints.

  setup(config, workdir, training=...)   -> RunSetup (nothing written to the workdir)
  open_checkpointer(run_setup, workdir, read_only=...)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from flt_jax.constants import IGNORE_LABEL
from flt_jax.data import config as data_config_lib
from flt_jax.data import pipeline as data_pipeline
from flt_jax.data.tokenizers import Tokenizer
from flt_jax.errors import config_error
from flt_jax.eval.evaluator import Evaluator
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import multihost
from flt_jax.parallel import sharding as sharding_lib
from flt_jax.run.program import Program, build_program, resolve_config
from flt_jax.train.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class RunSetup(Program):
  """A Program with its data: the tokenizer, bytes per token and the train pipeline."""

  tokenizer: Tokenizer
  token_bytes_V: np.ndarray  # int32 [V]: UTF-8 bytes of each token, for bits per byte
  train_pipeline: data_pipeline.Pipeline | None  # None when only evaluating

  def global_batch(self, host_batch: dict, keys, rows: int) -> dict:
    """Global arrays of `rows` sequences from this host's share of them (its
    process_index-th slice), split over the batch's mesh axes."""
    return sharding_lib.make_global_batch(
      {k: host_batch[k] for k in keys if k in host_batch}, self.batch_sharding, rows
    )

  @functools.cached_property
  def evaluator(self) -> Evaluator:
    """The program's sharded evaluator with this tokenizer's bytes per token; one per
    setup, so each (step, loop count) compiles once for training's evals and a sweep."""
    return self.make_evaluator(self.token_bytes_V)

  def describe_devices(self) -> str:
    """The startup line: devices, processes, mesh, per-device batch, parameters, and the
    attention kernel chosen for the devices' platform."""
    shards = sharding_lib.batch_shards(self.mesh, self.rules)
    micro = self.config.train.micro_batch_size
    return (
      f"devices: {mesh_lib.describe(self.mesh)} in {jax.process_count()} process(es) | "
      f"per-device batch {micro // shards} sequence(s) x {self.num_micro} micro-batch(es) "
      f"of {self.model_cfg.seq_len} tokens | {self.n_params['total']:,} params | "
      f"{self.model_cfg.describe_attention()}"
    )

  def eval_batches(self, data_config=None) -> data_pipeline.Pipeline:
    """A fresh pass over this host's validation batches (of `data_config`, default
    config.data). A fixed batch count keeps every host in step (padding batches carry no
    targets)."""
    return data_pipeline.make_pipeline(
      self.config.data if data_config is None else data_config,
      split="validation",
      seq_len=self.model_cfg.seq_len,
      batch_size=self.config.train.micro_batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_epochs=1,
      num_batches=self.config.train.eval_steps,
      tokenizer=self.tokenizer,
    )


def _check_hosts(config) -> None:
  """Every host gets the same share of a micro-batch (so of a whole batch too)."""
  hosts = jax.process_count()
  if config.train.micro_batch_size % hosts:
    raise config_error(
      "train.micro_batch_size",
      config.train.micro_batch_size,
      f"its sequences do not divide over the {hosts} hosts",
      "make it a multiple of the host count",
    )


def setup(config: ml_collections.ConfigDict, workdir: str, *, training: bool) -> RunSetup:
  """Resolves the config, joins the cluster, builds the tokenizer, then the program
  (`build_program`) and, when `training`, the train pipeline. Writes nothing.

  The vocabulary comes from the tokenizer when `config.model.vocab_size` is 0; the
  resolved size is written into the returned config, which is saved with every
  checkpoint, so a workdir trained with another vocabulary is refused.
  """
  config = resolve_config(config)
  # Before anything touches a JAX backend: on a pod every host joins the cluster here.
  multihost.initialize(config.mesh)
  multihost.check_workdir(workdir, jax.process_count(), config.mesh.shared_filesystem)
  _check_hosts(config)
  tokenizer = data_pipeline.make_tokenizer(config.data)
  program = build_program(config, tokenizer.vocab_size)
  config = program.config
  train_pipeline = None
  if training:  # a data error leaves the workdir untouched
    train_pipeline = data_pipeline.make_pipeline(
      config.data,
      split="train",
      seq_len=program.model_cfg.seq_len,
      batch_size=program.global_batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      tokenizer=tokenizer,
    )
    if config.train.eval_every:
      _check_validation_data(config, program.model_cfg.seq_len, tokenizer)
  return RunSetup(
    **{f.name: getattr(program, f.name) for f in dataclasses.fields(Program)},
    tokenizer=tokenizer,
    token_bytes_V=np.asarray(tokenizer.token_bytes, np.int32),
    train_pipeline=train_pipeline,
  )


def open_checkpointer(run_setup: RunSetup, workdir: str, *, read_only: bool) -> Checkpointer:
  """The workdir's checkpoints with this run's model shape and tokenizer guard: writable
  for the run that holds the workdir lock (it alone may clean up unfinished saves), or
  read-only (a test's look at what a run saved; eval, sample and export open theirs in
  run/sweep.restore_checkpoint, before a RunSetup exists). Refuses an unwritable workdir
  (writable only), or one whose saved model shape or tokenizer differs."""
  return Checkpointer.from_config(
    workdir, run_setup.config, tokenizer=run_setup.tokenizer.identity(), read_only=read_only
  )


def _check_validation_data(config, seq_len: int, tokenizer: Tokenizer) -> None:
  """The first eval must not be where an empty validation split shows: build this
  host's validation pipeline (in-process) and read its first batch, before anything is
  written. ConfigError naming the fields and the fix otherwise."""
  d = config.data
  every = config.train.eval_every
  if d.source not in data_config_lib.SYNTHETIC_SOURCES and float(d.validation_fraction) == 0:
    raise config_error(
      "data.validation_fraction",
      d.validation_fraction,
      f"it leaves no validation data, but train.eval_every={every} evaluates on it",
      "set data.validation_fraction > 0 (e.g. 0.05), or train.eval_every=0 to train "
      "without evaluation",
    )
  if d.source in data_config_lib.SYNTHETIC_SOURCES and int(d.num_validation_examples) < 1:
    raise config_error(
      "data.num_validation_examples",
      d.num_validation_examples,
      f"it leaves no validation data, but train.eval_every={every} evaluates on it",
      "set it >= 1, or train.eval_every=0 to train without evaluation",
    )
  probe = ml_collections.ConfigDict(d.to_dict())
  probe.num_workers = 0  # a look at one batch needs no worker processes
  pipeline = data_pipeline.make_pipeline(
    probe,
    split="validation",
    seq_len=seq_len,
    batch_size=max(1, config.train.micro_batch_size // jax.process_count()),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_epochs=1,
    tokenizer=tokenizer,
  )
  first = next(iter(pipeline), None)
  if first is None or not np.any(first["targets"] != IGNORE_LABEL):
    raise config_error(
      "data.path" if d.path else "data.source",
      d.path or d.source,
      f"its validation split ({pipeline.description}) holds no tokens to evaluate on",
      "raise data.validation_fraction, point data.path at files with text in "
      f"data.text_column={d.text_column!r}, or set train.eval_every=0",
    )
