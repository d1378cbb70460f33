#!/usr/bin/env bash
# Multi-node launch with torchrun: run this on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 launch/torchrun.sh --config configs/t5-base.yaml \
#       --parallel.tensor_model_parallel_size 2
# Extra arguments go to `spactor train`. On a CPU machine GPUS_PER_NODE is the process count (gloo).
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m spactor_mega.cli train "$@"
