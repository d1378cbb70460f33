"""Training engines behind one contract (:class:`~spactor_mega.training.engines.base.Engine`):
Megatron-Core (DDP + Megatron's optimizers) and DeepSpeed ZeRO, registered by name in
:data:`spactor_mega.plan.engines.ENGINES`."""

from __future__ import annotations

from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.plan.engines import engine_spec, resolve

from .base import Engine


def build_engine(cfg, discriminator, generator, rtd_head, objective: SpactorObjective, bf16: bool) -> Engine:
    """The engine ``cfg.train.engine`` names, over the modules of this rank."""
    return resolve(engine_spec(cfg.train.engine).runtime)(cfg, discriminator, generator, rtd_head, objective, bf16)
