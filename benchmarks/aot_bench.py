"""Per-chip memory and FLOPs of the paper-preset train step on real TPU topologies,
compiled ahead of time on this machine (needs libtpu: pip install -r requirements-tpu.txt).

  python benchmarks/aot_bench.py [--topologies=v5e:16x16,v4:8x8x8,v6e:16x16]
      [--remat=none,loop] [--experiment=flt_12loop] [--micro_batch_size=512]
      [--mesh=data=-1,fsdp=16,tensor=1]

For every (topology, remat) it builds the paper preset's model, optimizer and sharded
train step (flt_jax.aot), compiles it for the topology with libtpu's compile-only client
and prints one table row:
  args/temp/total GiB  per-chip bytes from memory_analysis(): arguments (the sharded
                       state and batch), temporaries, and arguments + outputs - donated
                       aliases + temporaries + code, against the chip's HBM
  model TF             flops_per_token x tokens per step / chips (train.metrics formula)
  traced/model         matmul FLOPs of the traced step (scan lengths and rematerialised
                       forwards included) over the model count: remat's recompute
  XLA/model            cost_analysis() FLOPs over the model count (XLA counts each loop
                       body once, so this is far below 1 for a looped model)
The default micro-batch is the whole 512-sequence batch (one micro-batch), so that it
splits over 256 or 512 chips. The default mesh shards the state 16 ways (d_model 384
does not split 256 ways) and runs data parallelism across the groups of 16.
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flt_jax import aot, run  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--topologies", type=csv, default=["v5e:16x16", "v4:8x8x8", "v6e:16x16"])
  p.add_argument("--remat", type=csv, default=["none", "loop"])
  p.add_argument("--experiment", default="flt_12loop")
  p.add_argument("--preset", default="paper")
  p.add_argument("--micro_batch_size", type=int, default=512)
  p.add_argument("--vocab_size", type=int, default=aot.DEFAULT_VOCAB_SIZE)
  p.add_argument(
    "--mesh",
    type=lambda s: {k: int(v) for k, v in (kv.split("=") for kv in csv(s))},
    default={"data": -1, "fsdp": 16, "tensor": 1},
  )
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  aot.use_compile_only_devices()
  experiment = importlib.import_module(f"experiments.{args.experiment}")
  header = (
    "| topology | chips | remat | args GiB | temp GiB | total GiB | HBM GiB | fits "
    "| model TF/chip/step | traced/model | XLA/model | compile s |"
  )
  print(header)
  print("|" + "---|" * 12)
  for text in args.topologies:
    topology = aot.parse_topology(text)
    devices = aot.topology_devices(topology)
    for remat in args.remat:
      config = experiment.get_config(args.preset)
      config.model.remat = remat
      config.train.micro_batch_size = args.micro_batch_size
      config.mesh.update(args.mesh)
      config.mesh.allow_split_physical_axes = True  # fsdp=16 on v4's 8x8x8 torus
      program = run.build_program(config, args.vocab_size, devices)
      r, _ = aot.compile_train_step(program, topology.hbm_bytes, str(topology))
      print(
        f"| {topology} | {r.num_devices} | {remat} | {r.argument_bytes / aot.GIB:.2f} "
        f"| {r.temp_bytes / aot.GIB:.2f} | {r.total_bytes / aot.GIB:.2f} "
        f"| {r.hbm_bytes / aot.GIB:.0f} | {'yes' if r.fits else 'NO'} "
        f"| {r.model_flops / 1e12:.2f} | {r.traced_flops / r.model_flops:.3f} "
        f"| {r.compiled_flops / r.model_flops:.3f} | {r.compile_seconds:.0f} |"
        + (" XLA refused: out of HBM |" if r.out_of_memory else ""),
        flush=True,
      )
  print(
    f"{args.experiment}:{args.preset}, global batch {program.global_batch_size} x "
    f"{program.model_cfg.seq_len} tokens in {program.num_micro} micro-batch(es), "
    f"vocab {program.model_cfg.vocab_size}, mesh {args.mesh}"
  )


if __name__ == "__main__":
  main()
