"""One host of a simulated two-host run (tests/parallel/test_multihost.py): two
processes on this machine, each with two CPU devices, joined by jax.distributed through
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (what launch/gpu_slurm.sbatch
sets), with gloo for the cross-process collectives.

  python tests/parallel/multihost_worker.py WORKDIR STEPS
"""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flt_jax import run  # noqa: E402
from tests.helpers.runs import two_micro_batch_config  # noqa: E402

workdir, steps = sys.argv[1], int(sys.argv[2])
c = two_micro_batch_config(steps=steps, data=2, fsdp=-1)
c.mesh.shared_filesystem = True  # both "hosts" see this machine's disk
summary = run.train_and_evaluate(c, workdir)
out = Path(workdir) / f"summary_process{jax.process_index()}.json"
out.write_text(json.dumps({"summary": summary, "devices": jax.device_count()}))
