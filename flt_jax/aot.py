r"""Compile the sharded train step ahead of time for a TPU or GPU topology, on any machine.

  python -m flt_jax.aot --config=experiments/flt_12loop.py:paper --topology=v5e:16x16
  python -m flt_jax.aot --config=experiments/flt_12loop.py:paper --topology=v4:8x8x8 \
      --config.mesh.data=8 --config.mesh.fsdp=-1 --config.model.remat=none
  python -m flt_jax.aot --config=experiments/flt_12loop.py:paper --topology=2xv5e:16x16 \
      --config.mesh.dcn_data=2                                          # two slices
  python -m flt_jax.aot --config=experiments/flt_12loop.py:paper --topology=h100:8 \
      --config.model.attention_impl=auto                                # one 8-GPU host
  python -m flt_jax.aot --config=experiments/flt_12loop.py:paper --topology=h100:2x8 \
      --config.mesh.dcn_data=2                                          # two hosts

A compile-only client describes the topology's devices (no accelerator needed): libtpu's
for TPUs (requirements-tpu.txt), the CUDA plugin's for GPUs (requirements-gpu-aot.txt),
which takes XLA's description of the GPU from `flt_jax/gpu_targets.py`. The train step
that training runs (`run.build_program`, the one builder training, eval and this command
share) is lowered with the config's mesh and sharding rules, its model built for the
topology's platform (so `attention_impl` picks that platform's kernels), and XLA compiles
it for that device. The command prints, per device, the bytes of the arguments, outputs
and temporaries (`memory_analysis()`), the compiled FLOPs (`cost_analysis()`) against
the model FLOPs formula (`flt_jax.train.metrics.flops_per_token`), whether the step fits
the device's memory, and the attention kernel with its custom calls in the compiled
step. No data is read: the vocabulary size comes from `config.model.vocab_size` or
`--vocab_size`.

A TPU topology is `<chip>:<shape>` as Cloud TPU names it (v4:4x4x4, v5e:16x16,
v5p:4x4x8, v6e:8x8), with an `Nx` prefix for N slices (2xv5e:16x16). A GPU topology is
`<gpu>:<gpus per host>` or `<gpu>:<hosts>x<gpus per host>` (h100:8, h200:8, h100:2x8,
a100:8); hosts are the DCN granules (`mesh.dcn_*`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import time
from contextlib import nullcontext

import jax
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from flt_jax import cli, gpu_targets, quiet_start
from flt_jax.errors import ConfigError
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.run import Program, build_program
from flt_jax.train import metrics as metrics_lib

GIB = 1024**3
# HBM per chip (one JAX device; v4 and v5p run as megacore: both TensorCores of a chip
# are one device). Cloud TPU system architecture documentation.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# Chips whose two TensorCores are fused into one device (libtpu's "megacore" config).
MEGACORE_CHIPS = ("v4", "v5p")
# The paper preset trains a 65,536-token BPE (flt_jax/presets.py); used when neither
# the config nor --vocab_size gives a size.
DEFAULT_VOCAB_SIZE = 65536

_TOPOLOGY = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_TOPOLOGY = re.compile(r"^(" + "|".join(gpu_targets.GPUS) + r"):(?:(\d+)x)?(\d+)$")
# JAX preallocates this share of a GPU's memory for XLA (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_GPU_MEMORY_FRACTION = 0.75


# ----------------------------------------------------------------------------
# Topologies.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # TPU: as libtpu names it, e.g. v5e:16x16; GPU: h100:2x8
  chip: str  # v4 | v5e | v5p | v6e | h100 | h200 | a100
  num_slices: int  # TPU slices (1 for GPUs)
  hosts: int = 1  # GPU hosts
  gpus_per_host: int = 0  # 0 for TPUs

  @property
  def platform(self) -> str:
    return "gpu" if self.chip in gpu_targets.GPUS else "tpu"

  @property
  def hbm_bytes(self) -> int:
    if self.platform == "gpu":
      return gpu_targets.GPUS[self.chip].memory_bytes
    return HBM_BYTES[self.chip]

  def __str__(self) -> str:
    return self.name if self.num_slices == 1 else f"{self.num_slices}x{self.name}"


def parse_topology(text: str) -> Topology:
  text = text.strip()
  match = _TOPOLOGY.match(text)
  if match:
    slices, chip, shape = match.groups()
    return Topology(name=f"{chip}:{shape}", chip=chip, num_slices=int(slices or 1))
  match = _GPU_TOPOLOGY.match(text)
  if match and int(match.group(3)) >= 1 and int(match.group(2) or 1) >= 1:
    gpu, hosts, per_host = match.group(1), int(match.group(2) or 1), int(match.group(3))
    name = f"{gpu}:{per_host}" if hosts == 1 else f"{gpu}:{hosts}x{per_host}"
    return Topology(name=name, chip=gpu, num_slices=1, hosts=hosts, gpus_per_host=per_host)
  raise ConfigError(
    f"--topology={text!r} is not a TPU or GPU topology. Fix: write <chip>:<shape> with chip "
    f"in {tuple(HBM_BYTES)}, e.g. v5e:16x16, v4:4x4x4, v6e:8x8, and an Nx prefix for N "
    f"slices, e.g. 2xv5e:16x16; or <gpu>:<gpus per host> / <gpu>:<hosts>x<gpus per host> "
    f"with gpu in {tuple(gpu_targets.GPUS)}, e.g. h100:8, h100:2x8."
  )


def use_compile_only_devices() -> None:
  """Before anything starts JAX: trace on the CPU and take TPU or GPU devices only from
  the compile-only clients, so that the command never claims an accelerator attached to
  this machine (a training run may hold it) and may load libtpu while another process
  has it."""
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the topology (libtpu or the CUDA plugin; no device attached)."""
  if topology.platform == "gpu":
    return _gpu_devices(topology)
  kwargs = {}
  if topology.num_slices > 1:
    kwargs["num_slices"] = topology.num_slices
  if topology.chip in MEGACORE_CHIPS:
    kwargs["chip_config_name"] = "megacore"
  try:
    with _libtpu_told_the_slice(topology):
      return list(topologies.get_topology_desc(topology.name, "tpu", **kwargs).devices)
  except Exception as e:  # libtpu missing, or a shape it does not know
    raise ConfigError(
      f"libtpu could not describe TPU topology {topology}: {type(e).__name__}: {e}. "
      "Fix: install the TPU build (pip install -r requirements-tpu.txt) and use a valid "
      "slice shape for the chip (e.g. v5e:16x16, v4:4x4x4)."
    ) from e


@contextlib.contextmanager
def _libtpu_told_the_slice(topology: Topology):
  """Off a TPU VM libtpu cannot find its accelerator type and workers and prints a
  five-line error block when it starts; for that start (the compile-only topology is the
  one requested either way) name them as a VM of this slice would. The environment is
  restored after, so child processes do not take this machine for a TPU VM."""
  names = {"TPU_ACCELERATOR_TYPE": _cloud_tpu_type(topology), "TPU_WORKER_HOSTNAMES": "localhost"}
  added = [] if quiet_start.tpu_present() else [k for k in names if k not in os.environ]
  os.environ.update({k: names[k] for k in added})
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def _cloud_tpu_type(topology: Topology) -> str:
  """Cloud TPU's accelerator type of one slice: v5litepod-16, v6e-16, v4-32 (v4 and v5p
  count TensorCores, two a chip)."""
  chips = math.prod(int(n) for n in topology.name.split(":")[1].split("x"))
  prefix = {"v5e": "v5litepod", "v6e": "v6e", "v4": "v4", "v5p": "v5p"}[topology.chip]
  return f"{prefix}-{chips * (2 if topology.chip in MEGACORE_CHIPS else 1)}"


def _gpu_devices(topology: Topology) -> list:
  """`hosts x gpus_per_host` compile-only GPUs described by gpu_targets (partitions x
  hosts x GPUs per host is the CUDA client's topology string)."""
  spec = gpu_targets.GPUS[topology.chip]
  try:
    return list(
      topologies.get_topology_desc(
        platform="cuda",
        target_config=gpu_targets.target_config(spec),
        topology=f"1x{topology.hosts}x{topology.gpus_per_host}",
      ).devices
    )
  except Exception as e:  # the CUDA plugin missing, or a description it cannot read
    raise ConfigError(
      f"the CUDA plugin could not describe GPU topology {topology}: {type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}. Fix: install it (pip install --no-deps "
      "-r requirements-gpu-aot.txt, or requirements-gpu.txt on a GPU machine)."
    ) from e


# ----------------------------------------------------------------------------
# Compile and report.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileReport:
  topology: str
  device_kind: str
  num_devices: int
  mesh: str
  remat: str
  global_batch: int
  num_micro: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  compiled_flops: float  # XLA cost_analysis, per device (see format_report)
  traced_flops: float  # matmul FLOPs of the traced step, per device
  model_flops: float  # flops_per_token x tokens, per device
  lower_seconds: float
  compile_seconds: float
  # XLA's message when it refused to compile for lack of HBM (temp_bytes is then the
  # temporaries it asked for, and the state sizes are computed from the shardings).
  out_of_memory: str = ""
  platform: str = ""  # tpu | gpu | cpu
  attention: str = ""  # the model's choice (ModelConfig.describe_attention)
  # ((family, kernel), custom calls) of attention kernels in the compiled step's HLO.
  attention_calls: tuple = ()

  @property
  def total_bytes(self) -> int:
    """Peak-ish footprint: live arguments + outputs (less donated aliases) + temporaries."""
    return (
      self.argument_bytes
      + self.output_bytes
      - self.alias_bytes
      + self.temp_bytes
      + (self.code_bytes)
    )

  @property
  def fits(self) -> bool:
    return not self.out_of_memory and self.total_bytes <= self.hbm_bytes


def _sub_jaxprs(params) -> list:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        found.append(item)
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        found.append(item.jaxpr)
  return found


def matmul_flops(key) -> float:
  """FLOPs of one dot_general given as (lhs shape, rhs shape, dimension numbers)."""
  lhs_shape, rhs_shape, ((lhs_contract, _), (lhs_batch, _)) = key
  shared = math.prod(lhs_shape[d] for d in lhs_contract + lhs_batch)
  return 2.0 * math.prod(lhs_shape) * math.prod(rhs_shape) / shared


def jaxpr_matmuls(jaxpr) -> collections.Counter:
  """How often a jaxpr runs each dot_general, keyed (lhs shape, rhs shape, dimension
  numbers), sub-jaxprs included: a scan body counts `length` times, a cond its most
  expensive branch, a while body once (its trip count is not static). The backward pass
  of a rematerialised function re-runs its forward inside, so recompute is counted."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      numbers = tuple(tuple(tuple(d) for d in pair) for pair in eqn.params["dimension_numbers"])
      counts[(tuple(lhs), tuple(rhs), numbers)] += 1
      continue
    inner = [jaxpr_matmuls(sub) for sub in _sub_jaxprs(eqn.params)]
    if name == "cond" and inner:
      inner = [max(inner, key=lambda c: sum(matmul_flops(k) * n for k, n in c.items()))]
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in inner:
      for key, n in sub.items():
        counts[key] += times * n
  return counts


def jaxpr_matmul_flops(jaxpr) -> float:
  """FLOPs of every dot_general in a jaxpr, counted as `jaxpr_matmuls` counts them."""
  return sum(matmul_flops(key) * n for key, n in jaxpr_matmuls(jaxpr).items())


# Attention kernels in compiled HLO: a custom call's target, and for Pallas kernels the
# kernel's name, from the op_name metadata (".../flt_flash_dq)/pallas_call") or else the
# instruction's own name (splash's "%splash_mha_fwd_residuals.3 = ...").
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_PALLAS_KERNEL = re.compile(r'op_name="[^"]*?(\w+)\)*/pallas_call')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([A-Za-z_]\w*?)(?:\.\d+)* = ")
_PALLAS_TARGETS = {"__gpu$xla.gpu.triton": "Triton", "tpu_custom_call": "Mosaic"}


def attention_kernel_calls(hlo_text: str) -> collections.Counter:
  """Custom calls of attention kernels in compiled HLO text, keyed (family, kernel):
  ("cuDNN fmha", "fmhaSoftmax"), ("Triton flash", "flt_flash_fwd"), ("Mosaic flash",
  "flt_flash_dkv"), ("splash", <its kernel>). A loop body's calls count once."""
  calls = collections.Counter()
  for line in hlo_text.splitlines():
    target = _CUSTOM_CALL_TARGET.search(line) if "custom-call(" in line else None
    if target is None:
      continue
    target = target.group(1)
    if target.startswith("__cudnn$fmha"):
      calls[("cuDNN fmha", target.removeprefix("__cudnn$"))] += 1
    elif target in _PALLAS_TARGETS:
      kernel = _PALLAS_KERNEL.search(line) or _INSTRUCTION.match(line)
      kernel = kernel.group(1) if kernel else ""
      if kernel.startswith("flt_flash"):
        calls[(f"{_PALLAS_TARGETS[target]} flash", kernel)] += 1
      elif "splash" in kernel:
        calls[("splash", kernel)] += 1
  return calls


def describe_attention_calls(calls) -> str:
  """`cuDNN fmha: 2 custom calls (fmhaSoftmax 1, fmhaSoftmaxBackward 1)`; per family."""
  if not calls:
    return "no attention kernel (XLA's own fusions)"
  families = {}
  for (family, kernel), n in sorted(dict(calls).items()):
    families.setdefault(family, []).append((kernel, n))
  return "; ".join(
    f"{family}: {sum(n for _, n in kernels)} custom calls ("
    + ", ".join(f"{kernel} {n}" for kernel, n in kernels)
    + ")"
    for family, kernels in families.items()
  )


_HBM_OOM = re.compile(r"RESOURCE_EXHAUSTED: .*HLO temporaries \(([\d.]+)G\)")


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every ShapeDtypeStruct in `tree`."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for x in jax.tree_util.tree_leaves(tree)
  )


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_train_step(program: Program, hbm_bytes: int, topology: str = ""):
  """Lowers and compiles the program's train step (the one training runs, over the
  program's mesh of concrete or compile-only devices); returns (CompileReport,
  compiled)."""
  step = program.train_step(diagnostics=False)
  args = program.abstract_train_args()
  devices = list(program.mesh.devices.flat)
  start = time.perf_counter()
  traced = step.trace(*args)  # one trace for the matmul count and the lowering
  lowered = traced.lower()
  lower_seconds = time.perf_counter() - start
  traced_flops = jaxpr_matmul_flops(traced.jaxpr.jaxpr)
  oom = ""
  try:
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    arg_bytes, out_bytes, alias_bytes = (
      memory.argument_size_in_bytes,
      memory.output_size_in_bytes,
      memory.alias_size_in_bytes,
    )
    temp_bytes, code_bytes = memory.temp_size_in_bytes, memory.generated_code_size_in_bytes
    compiled_flops = float(_cost(compiled).get("flops", float("nan")))
    calls = attention_kernel_calls(compiled.as_text())
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU refuses to compile a program that cannot fit; report how much it wanted.
    match = _HBM_OOM.search(str(e))
    if not match:
      raise
    compiled, oom = None, str(e).splitlines()[0]
    arg_bytes = out_bytes = alias_bytes = _bytes_per_device(args[0])
    arg_bytes += _bytes_per_device(args[1])
    temp_bytes, code_bytes = int(float(match.group(1)) * GIB), 0
    compiled_flops = float("nan")
    calls = collections.Counter()
  seconds = time.perf_counter() - start - lower_seconds
  tokens_per_step = program.tokens_per_step
  report = CompileReport(
    topology=topology or str(devices[0].platform),
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    mesh=mesh_lib.describe(program.mesh).split(" (")[0],
    remat=program.model_cfg.remat,
    global_batch=program.global_batch_size,
    num_micro=program.num_micro,
    argument_bytes=int(arg_bytes),
    output_bytes=int(out_bytes),
    alias_bytes=int(alias_bytes),
    temp_bytes=int(temp_bytes),
    code_bytes=int(code_bytes),
    hbm_bytes=int(hbm_bytes),
    compiled_flops=compiled_flops,
    traced_flops=traced_flops / len(devices),
    model_flops=metrics_lib.flops_per_token(program.model_cfg) * tokens_per_step / len(devices),
    lower_seconds=lower_seconds,
    compile_seconds=seconds,
    out_of_memory=oom,
    platform=program.model_cfg.platform,
    attention=program.model_cfg.describe_attention(),
    attention_calls=tuple(sorted(calls.items())),
  )
  return report, compiled


def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


def format_report(report: CompileReport, title: str = "") -> str:
  r = report
  lines = [
    f"{title}{r.topology}: {r.num_devices} x {r.device_kind} | mesh {r.mesh} | remat "
    f"{r.remat} | global batch {r.global_batch} in {r.num_micro} micro-batch(es) | "
    f"lowered in {r.lower_seconds:.1f} s, compiled in {r.compile_seconds:.1f} s",
    "per device        bytes",
    f"  arguments       {_gib(r.argument_bytes)}",
    f"  outputs         {_gib(r.output_bytes)}",
    f"  aliased         {_gib(r.alias_bytes)}   (donated state reused for the new state)",
    f"  temporaries     {_gib(r.temp_bytes)}"
    + ("   (what XLA asked for before refusing)" if r.out_of_memory else ""),
    f"  code            {_gib(r.code_bytes)}",
    f"  total           {_gib(r.total_bytes)} of {_gib(r.hbm_bytes)} HBM: "
    + ("fits" if r.fits else "DOES NOT FIT")
    + f" ({100 * r.total_bytes / r.hbm_bytes:.1f}%)",
  ]
  if r.platform == "gpu":
    lines.append(
      f"                  (JAX gives XLA {JAX_GPU_MEMORY_FRACTION:.0%} of it by default: "
      f"{_gib(JAX_GPU_MEMORY_FRACTION * r.hbm_bytes)}; XLA_PYTHON_CLIENT_MEM_FRACTION)"
    )
  lines += [
    "per device and step, FLOPs",
    f"  model           {r.model_flops:.4g}   (train.metrics.flops_per_token x tokens / devices)",
    f"  traced matmuls  {r.traced_flops:.4g}   ({r.traced_flops / r.model_flops:.3f} x model; "
    "every dot_general of the step, scan lengths and remat recompute included; attention "
    "inside a fused kernel's custom call is not a dot_general)",
    f"  XLA cost        {r.compiled_flops:.4g}   ({r.compiled_flops / r.model_flops:.3f} x model; "
    "cost_analysis() of the compiled step, which counts each loop body once)"
    if math.isfinite(r.compiled_flops)
    else "  XLA cost        n/a   (cost_analysis() of the compiled step gives no FLOPs here)",
  ]
  if r.attention:
    calls = "" if r.out_of_memory else " | " + describe_attention_calls(dict(r.attention_calls))
    lines.append(r.attention + calls)
  if r.out_of_memory:
    lines.append(f"XLA: {r.out_of_memory}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags() -> None:
  """Defines the command's flags. Called only when the module runs as a program: absl
  flags are global, so this module imports beside the other commands (flt_jax.main)."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with a preset: file.py:preset."
  )
  flags.DEFINE_string(
    "topology",
    None,
    "TPU topology (v5e:16x16, v4:4x4x4, v6e:8x8, 2xv5e:16x16) or GPU topology "
    "(h100:8, h200:8, a100:8; h100:2x8 = 2 hosts of 8 GPUs).",
  )
  flags.DEFINE_integer(
    "vocab_size",
    0,
    "Vocabulary size when config.model.vocab_size is 0 (the tokenizer's, unknown without "
    f"data); 0 = {DEFAULT_VOCAB_SIZE}, the paper preset's tokenizer.",
  )
  flags.mark_flags_as_required(["config"])


def run(config, topology_text: str, vocab_size: int = 0) -> CompileReport:
  topology = parse_topology(topology_text)
  tokenizer_vocab = None
  if config.model.vocab_size == 0:
    tokenizer_vocab = vocab_size or DEFAULT_VOCAB_SIZE
  # The CUDA plugin's libraries log that this machine has no GPU driver when the client
  # and the compiler load them: noise for a command that compiles for a GPU elsewhere.
  with quiet_start.cuda_noise_filtered() if topology.platform == "gpu" else nullcontext():
    program = build_program(config, tokenizer_vocab, topology_devices(topology))
    report, _ = compile_train_step(program, topology.hbm_bytes, str(topology))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.topology:
    raise app.UsageError("--topology is required, e.g. --topology=v5e:16x16 or h100:8")
  use_compile_only_devices()
  config = flags.FLAGS.config
  try:
    report = run(config, flags.FLAGS.topology, flags.FLAGS.vocab_size)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  name = config.get("experiment", "") or config.model.variant
  print(format_report(report, f"{name} {config.get('preset', '')} K={config.model.loops} on "))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
