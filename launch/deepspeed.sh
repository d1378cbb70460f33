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
: "${MASTER_PORT:=29500}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
args=(--no_local_rank --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
else
  : "${GPUS_PER_NODE:=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}"
  args+=(--num_gpus "$GPUS_PER_NODE")
fi
exec deepspeed "${args[@]}" --module spactor_mega.cli train --train.engine deepspeed --train.resume auto "$@"
