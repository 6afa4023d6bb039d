"""The experiments' shared base: one ConfigDict, presets by name.

Experiment files (`experiments/*.py`) call `make(variant, loops, preset)`; the preset
comes from the command line as `--config=experiments/flt_12loop.py:paper`. It lives in
the package (not next to the experiment files) so that an experiment file loads from
any working directory: ml_collections loads it by path, and `from flt_jax import
presets` works wherever flt_jax is importable.

Presets
  cpu       (default) the paper's recipe scaled down: pretrains on the embedded
            Python-stdlib text corpus and finishes within minutes on 2 CPU cores
            (two XLA CPU devices, the batch split over them).
  multihop  trains on the embedded multi-hop pointer-chasing task (4 nodes,
            1-3 hops, loss on the answer only; d_model 64, 4 heads, Muon lr
            0.005) for 1,000 steps of 128 examples and reports answer accuracy;
            `--mode=eval` adds the hops x K' table (README, "Evaluate at other
            loop counts"; benchmarks/readme_figures.py regenerates it).
  paper     the paper's shapes and recipe: n_layer 6, d_model 384,
            sequence 1024, 524,288-token batches, bf16 compute, 20 tokens per
            parameter, fineweb-edu Parquet shards at --config.data.path and a
            65,536-token BPE at --config.data.tokenizer_path (see README, Data).
"""

from __future__ import annotations

import math

import ml_collections

from flt_jax import config as flt_config

PRESETS = ("cpu", "multihop", "paper")


def shape_for(n_layer: int) -> dict:
  """The reference's shape rule: d_model = 64 * n_layer, head dim 128."""
  d_model = 64 * n_layer
  n_head = max(1, math.ceil(d_model / 128))
  return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_head)


def get_base_config() -> ml_collections.ConfigDict:
  return flt_config.default_config()


def make(variant: str, loops: int, preset: str | None) -> ml_collections.ConfigDict:
  preset = preset or "cpu"
  if preset not in PRESETS:
    raise ValueError(
      f"unknown preset {preset!r}; choose one of {PRESETS} "
      "(e.g. --config=experiments/flt_12loop.py:multihop)"
    )
  c = get_base_config()
  c.experiment = f"{variant}_{loops}loop"
  c.preset = preset
  c.model.variant = variant
  c.model.loops = loops
  if preset == "paper":
    c.model.update(shape_for(6))
    c.model.seq_len = 1024
    c.model.dtype = "bfloat16"
    c.model.remat = "loop"
    c.data.source = "parquet"
    c.data.path = ""  # required: --config.data.path='/data/fineweb-edu/*.parquet'
    # required: --config.data.tokenizer_path=tok/tokenizer.json, trained once with
    # python -m flt_jax.data.prepare train_tokenizer --vocab_size=65536 ...
    c.data.tokenizer = "file"
    c.data.tokenizer_path = ""
    c.train.steps = -1  # horizon from tokens_per_param
    c.train.tokens_per_param = 20.0
    c.train.total_batch_tokens = 524_288
    c.train.micro_batch_size = 32
    c.train.eval_every = 250
    c.train.eval_steps = 20
    c.train.log_every = 10
    c.checkpoint.every_steps = 500
  else:
    c.model.update(shape_for(2))  # d_model 128, one head of 128
    # Recompute each block in the backward pass, keeping only its input: on CPU every
    # stacked byte costs more than recomputing it (benchmarks/train_bench.py
    # --compare_remat; the figures: WORKSPACE.md, "Measurements behind the settings").
    c.model.remat = "block"
    c.model.remat_policy = "nothing"
    # Unrolled layer scan: XLA sees each layer's window and index as constants and slices
    # no stacked params (benchmarks/train_bench.py --tree, side by side; WORKSPACE.md).
    c.model.unroll_layers = True
    c.optim.muon_momentum_warmup_steps = 30
    c.train.log_every = 10
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    if preset == "cpu":
      # Two XLA CPU devices with the batch split over them: XLA:CPU runs batched matmuls
      # (attention) and elementwise fusions on one thread each, so one device leaves a
      # core idle (benchmarks/cpu_devices_bench.py; WORKSPACE.md).
      c.mesh.cpu_devices = 2
      # XLA:CPU's per-step buffers reuse the process's pages instead of faulting fresh ones
      # in every step (parallel/host_memory.py; WORKSPACE.md).
      c.mesh.cpu_reuse_memory = True
      c.mesh.data = -1
      c.mesh.fsdp = 1
      c.model.seq_len = 128
      c.data.source = "stdlib"
      c.data.tokenizer = "bytes"
      c.train.steps = 300
      c.train.total_batch_tokens = 8 * 128
      c.train.micro_batch_size = 8
      c.train.eval_every = 100
      c.train.eval_steps = 16
    else:  # multihop: short examples, many per step (the loss is on answers only)
      c.model.update(d_model=64, n_head=4, n_kv_head=4)  # 4 heads of 16 per layer
      c.data.source = "multihop"
      c.data.loss_on_answer_only = True  # the default for synthetic sources; said here
      # 4 nodes: with 5 the pointer lookup appears too late for the run (training runs:
      # WORKSPACE.md); 3 leave many copy shortcuts (f^2(x) = x for 2/3 of the 2-hop
      # queries).
      c.data.multihop.num_nodes = 4
      c.data.multihop.hops_min = 1
      c.data.multihop.hops_max = 3
      # The longest example: 4 entries "a > b ," + "| x hops k ?" + answer + eos = 22.
      c.model.seq_len = 4 * c.data.multihop.num_nodes + 5
      # A small AdamW lr for the embedding: the default is 0.2 x (64/768)**-0.5 = 0.69 per
      # step on entries of std 1 (a choice by reasoning; no full run compared the two).
      c.optim.embedding_lr = 0.02
      # Muon below its default 0.02, which kept the accuracy oscillating (training runs:
      # WORKSPACE.md). A likely reason: the shared weights are applied K times, so each
      # update acts K times.
      c.optim.matrix_lr = 0.005
      c.train.steps = 1000
      c.train.micro_batch_size = 128
      c.train.total_batch_tokens = 128 * c.model.seq_len
      c.train.eval_every = 100
      c.train.eval_steps = 4  # 4 x 128 = the 512 validation examples
  return c
