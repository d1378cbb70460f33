"""The DeepSpeed JSON config, generated from our :class:`~spactor_mega.config.Config`.

Our config stays the one source of truth for what both engines share (batch sizes, optimizer,
clipping, precision, LR schedule); ``deepspeed.config`` (a user JSON) is merged over the
generated dict for everything else (bucket sizes, overlap, AIO settings, ...). A user value
that contradicts a generated one is refused with the field that owns it. Importing this module
does not import deepspeed (``validate()`` calls :func:`check_deepspeed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from spactor_mega.config import Config, ConfigError, uses_bf16

OFFLOAD_DEVICES = ("none", "cpu", "nvme")

# Generated DeepSpeed fields -> the field of ours that sets them (named in conflict errors).
OWNERS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x data-parallel size)",
    "gradient_clipping": "optim.clip_grad",
    "optimizer.type": "optim.optimizer",
    "optimizer.params.lr": "optim.lr",
    "optimizer.params.betas": "optim.adam_beta1/adam_beta2",
    "optimizer.params.eps": "optim.adam_eps",
    "optimizer.params.weight_decay": "optim.weight_decay",
    "bf16.enabled": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_optimizer.nvme_path": "deepspeed.nvme_path",
    "zero_optimization.offload_param.device": "deepspeed.offload_param",
    "zero_optimization.offload_param.nvme_path": "deepspeed.nvme_path",
    "zero_optimization.stage3_prefetch_bucket_size": "the DeepSpeed engine (see generated_config)",
}
# User sections we refuse outright: they would replace what our config drives.
REFUSED = {
    "scheduler": "the LR schedule comes from optim.lr_schedule/warmup_steps (Megatron's scheduler drives both engines)",
    "fp16": "precision comes from train.precision (fp32 or bf16; fp16 loss scaling is not supported)",
}


def accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def generated_config(cfg: Config, dp: int, bf16: bool, use_torch_adam: bool) -> dict:
    """The DeepSpeed config our fields imply (before the user JSON)."""
    o, t, z = cfg.optim, cfg.train, cfg.deepspeed
    zero: dict = {"stage": z.zero_stage}
    if z.zero_stage == 3:
        # No ZeRO-3 prefetch: G (its own engine) reads D's embedding; a prefetch of it by D's
        # engine leaves it in flight where G's engine cannot wait for it (assertion in DeepSpeed).
        zero["stage3_prefetch_bucket_size"] = 0
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(z.offload_optimizer, z.nvme_path)
    if z.offload_param != "none":
        zero["offload_param"] = _offload(z.offload_param, z.nvme_path)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, dp),
        "gradient_clipping": o.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
                "weight_decay": o.weight_decay, "torch_adam": use_torch_adam,
            },
        },
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # our RunLogger reports; keep DeepSpeed's own step lines quiet
        "wall_clock_breakdown": False,
    }


def _offload(device: str, nvme_path: Optional[str]) -> dict:
    # pin_memory only helps host<->GPU copies; on CPU-only runs it is meaningless.
    entry: dict = {"device": device, "pin_memory": False}
    if device == "nvme":
        entry["nvme_path"] = nvme_path
    return entry


def read_user_config(path: Optional[str]) -> dict:
    if not path:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def merge_user_config(ours: dict, user: dict, source: str, _path: tuple = ()) -> dict:
    """``ours`` with ``user`` merged over it; a differing value at a generated field is refused."""
    merged = dict(ours)
    for key, value in user.items():
        where = ".".join(_path + (key,))
        if not _path and key in REFUSED:
            raise ConfigError(f"{source}: remove {key!r}: {REFUSED[key]}")
        if key not in ours:
            merged[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = merge_user_config(ours[key], value, source, _path + (key,))
        elif where not in OWNERS or ours[key] == value or (isinstance(value, list) and value == list(ours[key])):
            merged[key] = value  # a generated default the user may change (torch_adam, pin_memory, ...)
        else:
            owner = OWNERS[where]
            raise ConfigError(f"{source}: {where}={value!r} conflicts with {ours[key]!r} set by {owner}; "
                              "change it there (or drop it from the JSON)")
    return merged


def deepspeed_config(cfg: Config, dp: int, bf16: bool, use_torch_adam: bool) -> dict:
    """The full DeepSpeed config: generated, then the user JSON merged over it."""
    ours = generated_config(cfg, dp, bf16, use_torch_adam)
    path = cfg.deepspeed.config
    return merge_user_config(ours, read_user_config(path), f"deepspeed.config {path}")


def check_deepspeed(cfg: Config, dp: int) -> None:
    """``validate()``'s DeepSpeed part: one-line reasons, before any process group exists."""
    z = cfg.deepspeed
    if z.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {z.zero_stage}")
    for name in ("offload_optimizer", "offload_param"):
        if getattr(z, name) not in OFFLOAD_DEVICES:
            raise ConfigError(f"deepspeed.{name} must be one of {', '.join(OFFLOAD_DEVICES)}, got {getattr(z, name)!r}")
    if z.offload_optimizer != "none" and z.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 (ZeRO-0 keeps no optimizer partition to offload)")
    if z.offload_param != "none" and z.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_param needs deepspeed.zero_stage 3 (parameters are partitioned only there), got {z.zero_stage}")
    if "nvme" in (z.offload_optimizer, z.offload_param) and not z.nvme_path:
        raise ConfigError("deepspeed.nvme_path is required for nvme offload: a directory on a fast local disk")
    tp = cfg.parallel.tensor_model_parallel_size
    if tp > 1 and cfg.train.micro_batch_size < tp:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be >= parallel.tensor_model_parallel_size={tp} "
                          "with train.engine=deepspeed: each TP rank runs the generator on its own rows, and ZeRO "
                          "needs every rank to produce the generator's gradients")
    if cfg.optim.optimizer != "adamw":
        raise ConfigError(f"optim.optimizer={cfg.optim.optimizer} is not available with train.engine=deepspeed; use adamw")
    # Generate once so a bad or conflicting user JSON fails here, not after start-up.
    deepspeed_config(cfg, dp, bf16=uses_bf16(cfg), use_torch_adam=True)
