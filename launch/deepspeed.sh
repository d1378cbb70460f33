#!/usr/bin/env bash
# The DeepSpeed launcher (multi-node through a hostfile), with train.engine=deepspeed.
#   HOSTFILE=hosts launch/deepspeed.sh --config configs/zero3-offload.yaml     # hosts: "node0 slots=8" per line
#   GPUS_PER_NODE=2 launch/deepspeed.sh --config configs/zero2-offload.yaml    # this machine only
# Extra arguments go to `spactor train`. Run it on the first host; it reaches the others by
# passwordless ssh (pdsh when installed). On a CPU machine GPUS_PER_NODE is the process count
# (the launcher starts one process otherwise). torchrun works too: launch/torchrun.sh --train.engine deepspeed ...
# It resumes from the last complete checkpoint (--train.resume auto). On SIGTERM or SIGINT the DeepSpeed launcher
# sends SIGTERM to its process tree (the workers finish the step, save and exit 0; data-loader workers die), kills
# what is left 30 s later and exits 1; it restarts nothing. For restarts of a dead rank, saves longer than 30 s
# and a clean exit use launch/torchrun.sh --train.engine deepspeed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${MASTER_PORT:=29500}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
args=(--no_local_rank --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  # DeepSpeed's multi-node runner forwards only NCCL*, PYTHON*, UCX*, ... variables and the lines of its env file
  # (DS_ENV_FILE, default .deepspeed_env in ~ and here): launch/env.sh's go into a copy of that file
  name=${DS_ENV_FILE:-.deepspeed_env}
  [[ "$name" == /* ]] && sources=("$name") || sources=("$HOME/$name" "./$name")
  env_file="${TMPDIR:-/tmp}/spactor-deepspeed-env.$(id -u).$MASTER_PORT"
  : > "$env_file"
  for f in "${sources[@]}"; do [[ -f "$f" ]] && grep -v '^[[:space:]]*$' "$f" >> "$env_file"; done
  for var in "${LAUNCH_ENV_VARS[@]}"; do echo "$var=${!var}" >> "$env_file"; done
  export DS_ENV_FILE=$env_file
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
else
  : "${GPUS_PER_NODE:=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}"
  args+=(--num_gpus "$GPUS_PER_NODE")
fi
exec deepspeed "${args[@]}" --module spactor_mega.cli train --train.engine deepspeed --train.resume auto "$@"
