#!/usr/bin/env bash
# Train flt_jax on a Cloud TPU VM slice, or on several slices (multi-slice), with gcloud.
#
#   launch/tpu_vm.sh all --project=P --zone=us-east5-b --accelerator-type=v5litepod-16 \
#       --workdir=gs://BUCKET/flt12 -- --config=experiments/flt_12loop.py:paper \
#       --config.data.path='/data/fineweb-edu/*.parquet' --config.data.tokenizer_path=tok.json
#
# Steps (each one is also a command of its own):
#   create   a TPU VM (`tpu-vm create`), or a queued resource with --queued or --slices>1
#   setup    copy this checkout (tracked files) to every worker, pip install
#            requirements-tpu.txt there
#   run      python -m flt_jax.main on every worker at once (--worker=all); the output of
#            all workers streams here and is kept in ~/flt_jax_run.log on each
#   logs     follow worker 0's log of a run started earlier
#   delete   delete the TPU VM or queued resource
#   all      create, setup, run, delete (the slice is deleted even if the run fails)
#
# Settings (flags, or the environment variable in brackets):
#   --project [FLT_PROJECT]            required
#   --zone [FLT_ZONE]                  required
#   --accelerator-type [FLT_ACCELERATOR_TYPE]  required for create: v4-32, v5litepod-16,
#                                      v5p-16, v6e-16, ... (TensorCores for v4/v5p, chips
#                                      for v5e/v6e)
#   --name [FLT_TPU_NAME]              default flt-jax
#   --slices N                         multi-slice: N slices (a queued resource with
#                                      --node-count); adds --config.mesh.dcn_data=N
#   --queued                           create a queued resource even for one slice
#   --spot | --reserved                capacity type
#   --runtime-version V                default: the TPU VM base image for the chip
#   --workdir [FLT_WORKDIR]            passed to flt_jax.main; must be gs:// when the slice
#                                      has more than one host (every host writes there)
#   --dry-run                          print the commands instead of running them
# Arguments after `--` go to flt_jax.main unchanged.
set -euo pipefail

die() {
  echo "launch/tpu_vm.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

command_name="${1:-}"
[[ -n "$command_name" ]] || {
  usage
  exit 2
}
shift
case "$command_name" in
  create | setup | run | logs | delete | all) ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  *) die "unknown command '$command_name'; use one of create, setup, run, logs, delete, all" ;;
esac

project="${FLT_PROJECT:-}"
zone="${FLT_ZONE:-}"
accelerator_type="${FLT_ACCELERATOR_TYPE:-}"
name="${FLT_TPU_NAME:-flt-jax}"
workdir="${FLT_WORKDIR:-}"
slices=1
queued=0
capacity=""
runtime_version=""
dry_run=0
main_args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*) project="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator-type=*) accelerator_type="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --runtime-version=*) runtime_version="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) capacity="--spot" ;;
    --reserved) capacity="--reserved" ;;
    --dry-run) dry_run=1 ;;
    --)
      shift
      main_args=("$@")
      break
      ;;
    *) die "unknown option '$1' (options take the form --name=value; flt_jax.main arguments go after --)" ;;
  esac
  shift
done

[[ -n "$project" ]] || die "no project: pass --project=PROJECT or set FLT_PROJECT"
[[ -n "$zone" ]] || die "no zone: pass --zone=ZONE (e.g. us-east5-b) or set FLT_ZONE"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices=$slices must be a positive integer"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$name must be lower-case letters, digits and dashes, starting with a letter"
if ((slices > 1)); then
  queued=1
fi

# Chips per host are at most 8 on v4 (4 chips = 8 TensorCores), v5e, v5p and v6e hosts,
# so a slice whose type number is above 8 spans several hosts.
hosts_per_slice=1
if [[ -n "$accelerator_type" ]]; then
  [[ "$accelerator_type" =~ ^(v4|v5litepod|v5p|v6e)-([0-9]+)$ ]] ||
    die "--accelerator-type=$accelerator_type is not a TPU type this script knows; use v4-N, v5litepod-N, v5p-N or v6e-N"
  chip="${BASH_REMATCH[1]}"
  size="${BASH_REMATCH[2]}"
  if ((size > 8)); then
    hosts_per_slice=2 # at least; the exact count does not matter here
  fi
  if [[ -z "$runtime_version" ]]; then
    case "$chip" in
      v4) runtime_version="tpu-ubuntu2204-base" ;;
      v5litepod) runtime_version="v2-alpha-tpuv5-lite" ;;
      v5p) runtime_version="v2-alpha-tpuv5" ;;
      v6e) runtime_version="v2-alpha-tpuv6e" ;;
    esac
  fi
fi

needs_accelerator() {
  [[ -n "$accelerator_type" ]] ||
    die "no accelerator type: pass --accelerator-type=TYPE (e.g. v5litepod-16, v4-32, v6e-8) or set FLT_ACCELERATOR_TYPE"
}

needs_workdir() {
  [[ -n "$workdir" ]] || die "no workdir: pass --workdir=gs://BUCKET/RUN or set FLT_WORKDIR"
  if { ((hosts_per_slice > 1)) || ((slices > 1)); } && [[ "$workdir" != gs://* ]]; then
    die "--workdir=$workdir is not on Cloud Storage, but $accelerator_type x $slices slice(s) has several hosts, which all write checkpoints: use --workdir=gs://BUCKET/RUN"
  fi
}

# One word as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  printf '%s' "${out[*]}"
}

# Prints a command (shell-quoted) under --dry-run, runs it otherwise.
run() {
  if ((dry_run)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

scope=(--project="$project" --zone="$zone")
nodes=("$name")
if ((slices > 1)); then
  nodes=()
  for ((i = 0; i < slices; i++)); do
    nodes+=("$name-$i")
  done
fi

do_create() {
  needs_accelerator
  if ((queued)); then
    local placement=(--node-id="$name")
    if ((slices > 1)); then
      placement=(--node-count="$slices" --node-prefix="$name")
    fi
    run gcloud compute tpus queued-resources create "$name" "${scope[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
      "${placement[@]}" ${capacity:+"$capacity"}
    # Wait until the capacity is granted and the VMs are up.
    if ((dry_run)); then
      run gcloud compute tpus queued-resources describe "$name" "${scope[@]}" \
        --format='value(state.state)'
    else
      local state=""
      while [[ "$state" != "ACTIVE" ]]; do
        state="$(gcloud compute tpus queued-resources describe "$name" "${scope[@]}" \
          --format='value(state.state)')"
        case "$state" in
          FAILED | SUSPENDED) die "queued resource $name is $state" ;;
          ACTIVE) ;;
          *)
            echo "queued resource $name: ${state:-unknown}; waiting" >&2
            sleep 30
            ;;
        esac
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${scope[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" ${capacity:+"$capacity"}
  fi
}

# Runs a shell command on every worker of every slice (slices in parallel).
on_all_workers() {
  local remote="$1" pids=() node
  for node in "${nodes[@]}"; do
    if ((dry_run)) || ((${#nodes[@]} == 1)); then
      run gcloud compute tpus tpu-vm ssh "$node" "${scope[@]}" --worker=all --command="$remote"
    else
      gcloud compute tpus tpu-vm ssh "$node" "${scope[@]}" --worker=all --command="$remote" &
      pids+=($!)
    fi
  done
  local status=0 pid
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  return "$status"
}

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
archive="/tmp/flt_jax-$name.tar.gz"

do_setup() {
  # The tracked files as they are in this checkout (uncommitted edits included).
  if ((dry_run)); then
    echo "(cd $(quote "$repo_dir") && git ls-files -z | tar -czf $(quote "$archive") --null -T -)"
  else
    (cd "$repo_dir" && git ls-files -z | tar -czf "$archive" --null -T -)
  fi
  local node
  for node in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm scp "$archive" "$node:~/flt_jax.tar.gz" "${scope[@]}" --worker=all
  done
  on_all_workers "mkdir -p ~/flt_jax && tar -xzf ~/flt_jax.tar.gz -C ~/flt_jax && cd ~/flt_jax && python3 -m pip install -q -r requirements-tpu.txt"
}

do_run() {
  needs_accelerator
  needs_workdir
  local args=(python3 -m flt_jax.main --workdir="$workdir")
  if { ((hosts_per_slice > 1)) || ((slices > 1)); }; then
    args+=(--config.mesh.distributed=on)
  fi
  if ((slices > 1)); then
    args+=(--config.mesh.dcn_data="$slices")
  fi
  args+=("${main_args[@]}")
  on_all_workers "cd ~/flt_jax && $(quote_all "${args[@]}") 2>&1 | tee -a ~/flt_jax_run.log"
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${scope[@]}" --worker=0 \
    --command="tail -n 100 -f ~/flt_jax_run.log"
}

do_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${scope[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${scope[@]}" --quiet
  fi
}

case "$command_name" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all)
    needs_accelerator
    needs_workdir
    do_create
    status=0
    { do_setup && do_run; } || status=$?
    do_delete
    exit "$status"
    ;;
esac
