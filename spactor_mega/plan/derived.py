"""What a config implies beyond its fields: the resolved precision, G's depth, whether W&B logs."""

from __future__ import annotations

import torch

from spactor_mega.config import Config, ConfigError


def uses_bf16(cfg: Config) -> bool:
    """train.precision resolved (here only): ``auto`` is bf16 on a GPU with native bf16 (compute
    capability >= 8.0, or ROCm) and fp32 elsewhere, CPU included; ``bf16`` is bf16 wherever torch
    computes in it (CPU; GPUs natively or emulated) and a ConfigError on a GPU that cannot."""
    precision = cfg.train.precision
    if precision == "fp32":
        return False
    gpu = torch.cuda.is_available()
    if precision == "auto":
        return gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    if gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: this GPU ({torch.cuda.get_device_name()}) cannot compute in bf16; "
                          "use train.precision=fp32 (or auto, which picks bf16 only where the GPU has it)")
    return True


def generator_num_layers(cfg: Config) -> int:
    """G's layers: ``generator.depth_fraction`` of D's encoder layers, rounded, at least 1."""
    return max(1, round(cfg.generator.depth_fraction * cfg.model.num_encoder_layers))


def uses_wandb(cfg: Config) -> bool:
    """The run logs to Weights & Biases: a project is named and the mode is not disabled."""
    return bool(cfg.logging.wandb_project) and cfg.logging.wandb_mode != "disabled"
