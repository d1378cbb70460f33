"""The learning-rate schedule: warmup then decay, by Megatron's ``OptimizerParamScheduler``."""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spactor_mega.config import Config


def lr_decay_style(name: str) -> str:
    """Our schedule names -> Megatron's ``OptimizerParamScheduler`` decay styles."""
    return {"inverse-sqrt": "inverse-square-root", "constant-inverse-sqrt": "inverse-square-root",
            "cosine": "cosine", "constant": "constant"}[name]


def build_lr_scheduler(optimizer, cfg: Config):
    """Warmup then decay, by Megatron's ``OptimizerParamScheduler`` (it checkpoints its state).

    ``constant-inverse-sqrt`` is T5's schedule, ``lr * sqrt(warmup / max(step, warmup))`` (T5's
    ``1 / sqrt(max(step, 10^4))`` with lr 0.01 and 10k warmup steps): Megatron's inverse square
    root whose warmup starts at the peak instead of 0, i.e. constant over the warmup steps."""
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr if o.lr_schedule == "constant-inverse-sqrt" else 0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1),
        lr_decay_style=lr_decay_style(o.lr_schedule),
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train.steps, 1),
        wd_incr_style="constant",
    )
