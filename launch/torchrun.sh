#!/usr/bin/env bash
# Multi-node launch with torchrun: run this on every node.
#   NNODES=2 MASTER_ADDR=node0 GPUS_PER_NODE=8 launch/torchrun.sh --config configs/t5-base.yaml \
#       --parallel.tensor_model_parallel_size 2
# Extra arguments go to `spactor train`. On a CPU machine GPUS_PER_NODE is the process count (gloo).
# The nodes meet at MASTER_ADDR:MASTER_PORT (torchrun's c10d rendezvous, which numbers them; RDZV_ID names the
# job, the same on every node).
# Restarts without a human: a rank that dies makes torchrun restart the workers (up to MAX_RESTARTS times,
# default 3), and they resume from the last complete checkpoint (--train.resume auto; a later
# --train.resume flag overrides it).
# Preemption: SIGTERM, SIGUSR1 or SIGINT to this script makes every worker finish its step, save and exit 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${NNODES:=1}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${MAX_RESTARTS:=3}"
: "${RDZV_ID:=${SLURM_JOB_ID:-spactor}}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# The workers take the stop signals themselves (spactor_mega/training/preemption.py). torchrun would
# kill them 30 s after a SIGTERM and die of a SIGUSR1, and it starts them in sessions of their own, out of
# reach of a signal to this process group: so it runs with those signals ignored (and told not to take
# SIGTERM and SIGINT back), and this shell hands each one to torchrun's children, the workers.
(
  trap '' TERM INT USR1
  export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
  # A restart must not read the dead workers' addresses: torchrun's shared store (and the static rendezvous,
  # which always shares it) keeps them, and the restarted workers hang connecting to them (torch 2.13). Unshared,
  # each attempt's rank 0 starts a fresh store.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" -m spactor_mega.cli train --train.resume auto "$@"
) &
launcher=$!
for sig in TERM INT USR1; do
  trap "pkill -$sig -P $launcher || true" "$sig"
done
# `wait` returns early when a trapped signal arrives: wait again until torchrun has exited.
while :; do
  wait "$launcher" && status=0 || status=$?
  kill -0 "$launcher" 2>/dev/null || break
done
exit "$status"
