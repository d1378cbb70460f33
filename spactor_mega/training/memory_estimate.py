"""Per-rank memory of the model states (parameters, gradients, optimizer) for an engine setup.

Activations are not included (they depend on micro-batch, lengths and recomputation). The
rules follow what each engine keeps where:

- Megatron engine: parameters and fp32 gradient buffers replicated over DP; AdamW keeps fp32
  moments (and an fp32 master copy when training in bf16) on every DP rank.
- DeepSpeed ZeRO-s: s >= 1 splits the optimizer states over DP, s >= 2 the gradients too, s = 3
  the parameters as well; ``offload_optimizer`` moves the optimizer states (and ZeRO's fp32
  gradient partitions) to CPU memory, ``offload_param`` the parameter partitions.
"""

from __future__ import annotations

from spactor_mega.config import Config, uses_bf16


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    """``{"gpu": {...}, "cpu": {...}}`` bytes of params / grads / optimizer on one rank.
    ``params_per_rank``: parameters this rank holds before any ZeRO split (after TP)."""
    n, bf16 = params_per_rank, uses_bf16(cfg)
    weight = 2 if bf16 else 4
    adam = 8 if cfg.optim.optimizer == "adamw" else 0  # Adafactor's factored moments are ~O(rows + cols)
    optimizer = n * (adam + (4 if bf16 else 0))  # moments, plus the fp32 master copy in bf16
    gpu = {"params": float(n * weight), "grads": float(n * 4), "optimizer": float(optimizer)}  # fp32 grad buffers
    cpu = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
    if cfg.train.engine == "deepspeed":
        z = cfg.deepspeed
        stage = z.zero_stage
        gpu["grads"] = float(n * weight) / (dp if stage >= 2 else 1)
        if stage >= 1:
            gpu["optimizer"] /= dp
        if stage == 3:
            gpu["params"] /= dp
        if z.offload_optimizer != "none":
            cpu["optimizer"], gpu["optimizer"] = gpu["optimizer"], 0.0
            cpu["grads"] = n * 4 / dp  # fp32 gradient partitions the CPU optimizer steps on
        if z.offload_param != "none":
            cpu["params"], gpu["params"] = gpu["params"], 0.0
    return {"gpu": gpu, "cpu": cpu}


def describe_memory(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    """The ``--dry-run`` lines: our per-rank estimate, and DeepSpeed's own where it applies."""
    est = model_state_bytes(cfg, params_per_rank, dp)
    gib = 1024 ** 3

    def line(where: str) -> str:
        parts = est[where]
        return (f"{where.upper()} {sum(parts.values()) / gib:,.2f} GiB (params {parts['params'] / gib:,.2f}, "
                f"grads {parts['grads'] / gib:,.2f}, optimizer {parts['optimizer'] / gib:,.2f})")

    if cfg.train.engine == "deepspeed":
        z = cfg.deepspeed
        setup = f"DeepSpeed ZeRO-{z.zero_stage}, optimizer offload {z.offload_optimizer}, parameter offload {z.offload_param}"
    else:
        setup = "Megatron engine (DDP, optimizer replicated over DP)"
    lines = [f"memory per rank, model states only ({setup}, DP {dp}, {'bf16' if uses_bf16(cfg) else 'fp32'}): "
             f"{line('gpu')}; {line('cpu')}; plus activations"]
    if cfg.train.engine == "deepspeed" and uses_bf16(cfg) and z.zero_stage >= 2 and cfg.parallel.tensor_model_parallel_size == 1:
        lines.append("  DeepSpeed's own estimate (16-bit training, one node of DP GPUs): " + _deepspeed_estimate(cfg, params_per_rank, dp))
    return lines


def _deepspeed_estimate(cfg: Config, total_params: int, dp: int) -> str:
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (they assume 16-bit parameters)."""
    from spactor_mega.training.engines.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z, m = cfg.deepspeed, cfg.model
    if z.zero_stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, dp, 1, cpu_offload=z.offload_optimizer != "none")
    else:
        largest = max(m.d_model * 2 * m.d_ff + m.d_model * m.d_ff, 4 * m.d_model * m.num_heads * m.d_kv)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest, dp, 1, cpu_offload=z.offload_optimizer != "none",
            cpu_offload_params=z.offload_param != "none", zero_init=False,
        )
    return f"GPU {gpu / 1024 ** 3:,.2f} GiB, CPU {cpu / 1024 ** 3:,.2f} GiB (per node)"
