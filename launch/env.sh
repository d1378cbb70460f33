# The environment every launcher gives its workers (sourced by launch/torchrun.sh, which launch/slurm.sbatch
# runs on each node, and by launch/deepspeed.sh). A value already set wins. Names as torch 2.13 reads them.
# Megatron's TP/SP communication overlap relies on kernels reaching the GPU in issue order: one hardware queue
# (ZeRO-3 at TP 1 prefetches on a stream of its own and may do better with CUDA's default of 8: measure)
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# A failed or timed-out NCCL collective aborts its communicators and ends the process, so torchrun restarts the
# workers instead of every rank waiting forever (torchrun sets 1 too; the DeepSpeed launcher does not)
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# NCCL's flight recorder keeps each rank's last collectives (this many events) for the dump below
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
# On a collective timeout every rank writes them to <run>/nccl_trace/rank_<N> (the trainer points
# TORCH_NCCL_DEBUG_INFO_TEMP_FILE into the run's folder): `torchfrtrace` shows which rank hung where
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
LAUNCH_ENV_VARS=(CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_TRACE_BUFFER_SIZE
                 TORCH_NCCL_DUMP_ON_TIMEOUT)
