"""The training engines, by ``train.engine``: one registry line each.

An engine is a pair: its plan here (``validate(cfg, dp)``, ``model_state_bytes(cfg, params, dp)``,
``describe_setup(cfg)``, ``extra_memory_lines(cfg, params, dp)``: pure Python, run before any process group
exists) and its runtime, named as ``"module:attribute"`` strings (the engine class, its checkpoint
reader). The plan layer sits below the runtime layers, so it names them instead of importing
them; :func:`resolve` imports one when a command needs it (and only that engine's libraries).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from spactor_mega.config import ConfigError

from . import deepspeed, megatron


@dataclass(frozen=True)
class EngineSpec:
    plan: ModuleType
    runtime: str  # the class implementing spactor_mega.training.engines.base.Engine
    read_weights: str  # (checkpoint path, run record, module names) -> {module: {name: full tensor}}


ENGINES = {
    "megatron": EngineSpec(megatron, "spactor_mega.training.engines.megatron:MegatronEngine",
                           "spactor_mega.checkpoint.megatron:read_weights"),
    "deepspeed": EngineSpec(deepspeed, "spactor_mega.training.engines.deepspeed:DeepSpeedEngine",
                            "spactor_mega.checkpoint.deepspeed:read_weights"),
}


def engine_spec(name: str, where: str = "train.engine") -> EngineSpec:
    """The registry entry of engine ``name``; ``where`` names the field or file it came from."""
    if name not in ENGINES:
        raise ConfigError(f"{where}: unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return ENGINES[name]


def resolve(target: str):
    """The object a ``"module:attribute"`` string of :class:`EngineSpec` names."""
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)
