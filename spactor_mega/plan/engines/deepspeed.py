"""The DeepSpeed engine's plan: what it refuses, its DeepSpeed JSON config, and where ZeRO keeps
the model states.

The JSON config is generated from our :class:`~spactor_mega.config.Config`, which stays the one
source of truth for what both engines share (batch sizes, optimizer, clipping, precision, LR
schedule); ``deepspeed.config`` (a user JSON) is merged over the generated dict for everything
else (bucket sizes, overlap, AIO settings, ...). A user value that contradicts a generated one is
refused with the field that owns it.

ZeRO-s: s >= 1 splits the optimizer states over DP, s >= 2 the gradients too, s = 3 the
parameters as well; ``offload_optimizer`` moves the optimizer states (and ZeRO's fp32 gradient
partitions) to CPU memory, ``offload_param`` the parameter partitions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spactor_mega.config import Config, ConfigError
from spactor_mega.parallel.cpu_compat import import_deepspeed
from spactor_mega.plan.derived import uses_bf16
from spactor_mega.plan.flops import feed_forward_matmuls

from .megatron import (
    model_state_bytes as replicated_state_bytes,  # ZeRO-0 keeps what plain DDP keeps
)

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
}
# User sections we refuse outright: they would replace what our config drives.
REFUSED = {
    "scheduler": "the LR schedule comes from optim.lr_schedule/warmup_steps (Megatron's scheduler drives both engines)",
    "fp16": "precision comes from train.precision (fp32 or bf16; fp16 loss scaling is not supported)",
}


@dataclass(frozen=True)
class Adam:
    """Which AdamW DeepSpeed builds from the config's optimizer section (all the same update rule:
    AdamW with optim.adam_beta1/2, adam_eps, weight_decay). torch's fused AdamW goes through the
    config too (``torch_adam`` + ``fused``, which DeepSpeed passes on), not as a client optimizer:
    DeepSpeed then builds it over ZeRO's fp32 partitions as it builds its own ops, and the user
    JSON can still change it."""

    name: str
    torch_adam: bool  # DeepSpeed's ``torch_adam``: build torch.optim.AdamW instead of its own op
    fused: bool = False  # passed on to torch.optim.AdamW(fused=...) (one CUDA kernel per step)


DEEPSPEED_CPU_ADAM = Adam("DeepSpeedCPUAdam", torch_adam=False)
DEEPSPEED_FUSED_ADAM = Adam("DeepSpeed FusedAdam", torch_adam=False)
TORCH_FUSED_ADAMW = Adam("torch.optim.AdamW(fused=True)", torch_adam=True, fused=True)
TORCH_ADAMW = Adam("torch.optim.AdamW", torch_adam=True)


def choose_adam(offload: bool, cuda: bool, fused_adam_prebuilt: bool, cpu_adam_buildable: bool) -> Adam:
    """DeepSpeed's CPU Adam for offloaded optimizer states where its op can be built (a host C++
    compiler). On GPUs DeepSpeed's FusedAdam only when its op was built at install time: otherwise
    ``deepspeed.initialize`` JIT-compiles it, which needs an ``nvcc`` matching torch's CUDA (the run
    dies at start-up without one, and spends 1-3 minutes compiling with one), while torch's fused
    AdamW is one CUDA kernel per step too and needs no build. On CPU without offload torch's AdamW
    (fused Adam buys nothing there)."""
    if offload:
        return DEEPSPEED_CPU_ADAM if cpu_adam_buildable else TORCH_ADAMW
    if cuda:
        return DEEPSPEED_FUSED_ADAM if fused_adam_prebuilt else TORCH_FUSED_ADAMW
    return TORCH_ADAMW


def accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def generated_config(cfg: Config, dp: int, bf16: bool, adam: Adam, cuda: bool) -> dict:
    """The DeepSpeed config our fields imply (before the user JSON), for a run on CUDA or not.
    ZeRO-3 keeps DeepSpeed's parameter prefetch (its default bucket size): G's engine reads D's
    embedding, which both engines then fetch, and the DeepSpeed engine pairs their in-flight
    registries so that either can wait on the other's prefetch."""
    o, t, z = cfg.optim, cfg.train, cfg.deepspeed
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(z.offload_optimizer, z.nvme_path, cuda)
    if z.offload_param != "none":
        zero["offload_param"] = _offload(z.offload_param, z.nvme_path, cuda)
    precision: dict = {"bf16": {"enabled": bf16}}
    if bf16:
        precision.update(_bf16_gradients(z.zero_stage))
    optimizer: dict = {}  # Adafactor: torch's, handed to DeepSpeed by the engine (ZeRO-0 only, see check_deepspeed)
    if o.optimizer == "adamw":
        optimizer["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
                "weight_decay": o.weight_decay, "torch_adam": adam.torch_adam,
                **({"fused": True} if adam.fused else {}),
            },
        }
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, dp),
        "gradient_clipping": o.clip_grad,
        **optimizer,
        **precision,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # our RunLogger reports; keep DeepSpeed's own step lines quiet
        "wall_clock_breakdown": False,
    }


def _bf16_gradients(zero_stage: int) -> dict:
    """bf16 weights and activations; gradients reduced in fp32 at every ZeRO stage and accumulated
    over micro-batches in fp32 where DeepSpeed 0.19.8 can (ZeRO >= 1: an fp32 gradient partition
    or buffer; ZeRO-1 without offload runs its BF16_Optimizer). Without ZeRO it refuses
    ``grad_accum_dtype`` fp32 ("unsupported mix"), so ZeRO-0 accumulates in the bf16 ``.grad``.
    Master weights and optimizer state are fp32 at every stage (DeepSpeed's default)."""
    fields: dict = {"communication_data_type": "fp32"}
    if zero_stage > 0:
        fields["data_types"] = {"grad_accum_dtype": "fp32"}
    return fields


def _offload(device: str, nvme_path: Optional[str], cuda: bool) -> dict:
    # Pinned host buffers make the offload copies to and from the GPU asynchronous DMA; on
    # CPU-only runs there is no such copy (and pinning needs a CUDA driver).
    entry: dict = {"device": device, "pin_memory": cuda}
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


def deepspeed_config(cfg: Config, dp: int, bf16: bool, adam: Adam, cuda: bool) -> dict:
    """The full DeepSpeed config: generated, then the user JSON merged over it."""
    ours = generated_config(cfg, dp, bf16, adam, cuda)
    path = cfg.deepspeed.config
    user = read_user_config(path)
    if "optimizer" in user and "optimizer" not in ours:
        raise ConfigError(f"deepspeed.config {path}: remove 'optimizer': optim.optimizer={cfg.optim.optimizer} is torch's "
                          "optimizer, which the engine builds and hands to DeepSpeed")
    merged = merge_user_config(ours, user, f"deepspeed.config {path}")
    params = merged.get("optimizer", {}).get("params", {})
    if not params.get("torch_adam", False):
        params.pop("fused", None)  # torch.optim.AdamW's argument: DeepSpeed's own Adam ops take none
    return merged


def validate(cfg: Config, dp: int) -> None:
    """The plan's DeepSpeed part: one-line reasons, before any process group exists."""
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
    p = cfg.parallel
    for name in ("distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather", "sequence_parallel"):
        if getattr(p, name):
            raise ConfigError(f"parallel.{name} is a Megatron engine setting; with train.engine=deepspeed use "
                              "deepspeed.zero_stage (1-3 shard optimizer state, gradients, parameters) instead")
    if cfg.train.async_save:
        raise ConfigError("train.async_save is a Megatron engine setting: the DeepSpeed engine writes its checkpoints "
                          "synchronously (training waits for them); set train.async_save=false or use train.engine=megatron")
    tp = p.tensor_model_parallel_size
    if tp > 1 and cfg.train.micro_batch_size < tp:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be >= parallel.tensor_model_parallel_size={tp} "
                          "with train.engine=deepspeed: each TP rank runs the generator on its own rows, and ZeRO "
                          "needs every rank to produce the generator's gradients")
    if cfg.optim.optimizer == "adafactor" and z.zero_stage > 0:
        raise ConfigError(f"optim.optimizer=adafactor cannot run under deepspeed.zero_stage={z.zero_stage}: ZeRO 1-3 flatten "
                          "the parameters into 1-D partitions, so Adafactor's factored (row/column) second moments and "
                          "per-tensor RMS scaling cannot be kept; use train.engine=megatron (or deepspeed.zero_stage=0) "
                          "for Adafactor, or optim.optimizer=adamw")
    # Generate once so a bad or conflicting user JSON fails here, not after start-up.
    deepspeed_config(cfg, dp, bf16=uses_bf16(cfg), adam=TORCH_ADAMW, cuda=False)


def pipeline_refusal(cfg: Config) -> str:
    """Why this engine runs no pipeline (PP = 1 only)."""
    return (f"train.engine=deepspeed with parallel.pipeline_model_parallel_size={cfg.parallel.pipeline_model_parallel_size}: "
            "DeepSpeed forbids ZeRO-2/3 with pipelines, so we run DeepSpeed with PP = 1 only; set "
            "parallel.pipeline_model_parallel_size=1 or use train.engine=megatron")


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    n, z = params_per_rank, cfg.deepspeed
    est = replicated_state_bytes(cfg, n, dp)
    gpu, cpu = est["gpu"], est["cpu"]
    gpu["grads"] = float(n * (2 if uses_bf16(cfg) else 4)) / (dp if z.zero_stage >= 2 else 1)
    if z.zero_stage >= 1:
        gpu["optimizer"] /= dp
    if z.zero_stage == 3:
        gpu["params"] /= dp
    if z.offload_optimizer != "none":
        cpu["optimizer"], gpu["optimizer"] = gpu["optimizer"], 0.0
        cpu["grads"] = n * 4 / dp  # fp32 gradient partitions the CPU optimizer steps on
    if z.offload_param != "none":
        cpu["params"], gpu["params"] = gpu["params"], 0.0
    return est


def describe_setup(cfg: Config) -> str:
    z = cfg.deepspeed
    return f"DeepSpeed ZeRO-{z.zero_stage}, optimizer offload {z.offload_optimizer}, parameter offload {z.offload_param}"


def extra_memory_lines(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    """DeepSpeed's own estimate where it applies (16-bit, ZeRO-2/3, no TP)."""
    if not (uses_bf16(cfg) and cfg.deepspeed.zero_stage >= 2 and cfg.parallel.tensor_model_parallel_size == 1):
        return []
    return ["  DeepSpeed's own estimate (16-bit training, one node of DP GPUs): "
            + _deepspeed_estimate(cfg, params_per_rank, dp)]


def _deepspeed_estimate(cfg: Config, total_params: int, dp: int) -> str:
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (they assume 16-bit parameters)."""
    deepspeed = import_deepspeed()
    z, m = cfg.deepspeed, cfg.model
    if z.zero_stage == 2:
        cpu, gpu = deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total_params, dp, 1, cpu_offload=z.offload_optimizer != "none")
    else:
        # the largest layer: a feed-forward (two or three d_model x d_ff matrices) or the attention's four
        largest = max(feed_forward_matmuls(m.feed_forward) * m.d_model * m.d_ff, 4 * m.d_model * m.num_heads * m.d_kv)
        cpu, gpu, _ = deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs(
            total_params, largest, dp, 1, cpu_offload=z.offload_optimizer != "none",
            cpu_offload_params=z.offload_param != "none", zero_init=False,
        )
    return f"GPU {gpu / 1024 ** 3:,.2f} GiB, CPU {cpu / 1024 ** 3:,.2f} GiB (per node)"
