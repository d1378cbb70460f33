"""Per-rank memory of the model states (parameters, gradients, optimizer) for an engine setup.

Activations are not included (they depend on micro-batch, lengths and recomputation). Where each
engine keeps what is the engine's own plan (:mod:`spactor_mega.plan.engines`).
"""

from __future__ import annotations

from spactor_mega.config import Config
from spactor_mega.plan.derived import uses_bf16
from spactor_mega.plan.engines import engine_spec

GIB = 1024 ** 3


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    """``{"gpu": {...}, "cpu": {...}}`` bytes of params / grads / optimizer on one rank.
    ``params_per_rank``: parameters this rank holds before any ZeRO split (after TP)."""
    return engine_spec(cfg.train.engine).plan.model_state_bytes(cfg, params_per_rank, dp)


def describe_memory(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    """The ``--dry-run`` lines: our per-rank estimate, and the engine's own where it has one."""
    plan = engine_spec(cfg.train.engine).plan
    est = plan.model_state_bytes(cfg, params_per_rank, dp)

    def line(where: str) -> str:
        parts = est[where]
        return (f"{where.upper()} {sum(parts.values()) / GIB:,.2f} GiB (params {parts['params'] / GIB:,.2f}, "
                f"grads {parts['grads'] / GIB:,.2f}, optimizer {parts['optimizer'] / GIB:,.2f})")

    return [f"memory per rank, model states only ({plan.describe_setup(cfg)}, DP {dp}, "
            f"{'bf16' if uses_bf16(cfg) else 'fp32'}): {line('gpu')}; {line('cpu')}; plus activations",
            *plan.extra_memory_lines(cfg, params_per_rank, dp)]
