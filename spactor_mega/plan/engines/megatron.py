"""The Megatron engine's plan: what it refuses and where its model states live.

Parameters and fp32 gradient buffers are replicated over DP; AdamW keeps fp32 moments (and, in
bf16, an fp32 master copy) on every DP rank, or with ``parallel.distributed_optimizer`` a 1/DP
shard of them (Megatron's distributed optimizer: the gradient buffer stays whole, it is
reduce-scattered into it).
"""

from __future__ import annotations

from spactor_mega.config import Config, ConfigError
from spactor_mega.plan.derived import uses_bf16


def validate(cfg: Config, dp: int) -> None:
    """Every layout the config validation accepts works on this engine; the distributed optimizer
    needs an optimizer whose state is elementwise."""
    if cfg.parallel.distributed_optimizer and cfg.optim.optimizer == "adafactor":
        raise ConfigError("parallel.distributed_optimizer cannot shard optim.optimizer=adafactor: Megatron's "
                          "distributed optimizer steps flat 1-D shards of the parameters, which breaks Adafactor's "
                          "factored (row/column) moments; use optim.optimizer=adamw, or leave it off for Adafactor "
                          "(whose factored state is already small)")


def pipeline_refusal(cfg: Config) -> str:
    """Empty: the Megatron engine runs any pipeline layout the plan accepts."""
    return ""


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    """``{"gpu": {...}, "cpu": {...}}`` bytes of params / grads / optimizer on one rank."""
    n, bf16 = params_per_rank, uses_bf16(cfg)
    adam = 8 if cfg.optim.optimizer == "adamw" else 0  # Adafactor's factored moments are ~O(rows + cols)
    optimizer = n * (adam + (4 if bf16 else 0))  # moments, plus the fp32 master copy in bf16
    if cfg.parallel.distributed_optimizer:
        optimizer /= dp
    gpu = {"params": float(n * (2 if bf16 else 4)), "grads": float(n * 4), "optimizer": float(optimizer)}
    return {"gpu": gpu, "cpu": {"params": 0.0, "grads": 0.0, "optimizer": 0.0}}


def describe_setup(cfg: Config) -> str:
    if cfg.parallel.distributed_optimizer:
        return "Megatron engine (DDP, distributed optimizer: optimizer state sharded over DP)"
    return "Megatron engine (DDP, optimizer replicated over DP)"


def extra_memory_lines(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    return []
