"""Full tensors from TP shards and back, driven by Megatron's parameter attributes.

Megatron marks TP-split parameters with ``tensor_model_parallel=True``, ``partition_dim`` and
``partition_stride`` (stride 2 for the gated MLP's fc1: each rank holds ``[gate_r; up_r]``).
These helpers use exactly that, so they work for any module built from Megatron layers and our
own TP-split modules (the relative-position tables). For tests (TP=k vs TP=1), in-memory
conversion and small exports; large checkpoints go through ``dist_checkpointing``.

``group``: the TP group the module was built on - Megatron's (default) for D, ``g.tp_group``
(size 1) for G, whose layers are not split (G clears their TP marks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from . import collectives


def tp_attributes(param) -> tuple[bool, int, int]:
    """(TP-split?, partition_dim, partition_stride) as Megatron marks the parameter."""
    return (
        bool(getattr(param, "tensor_model_parallel", False)),
        int(getattr(param, "partition_dim", 0)),
        int(getattr(param, "partition_stride", 1)),
    )


def gather_tp_tensor(local: torch.Tensor, dim: int, stride: int = 1, group=None) -> torch.Tensor:
    """All-gathers TP shards along ``dim`` (honouring ``stride``) into the full tensor."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return local.detach().clone()
    return merge_tp_shards(collectives.all_gather(local.detach(), group), dim, stride)


def merge_tp_shards(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order (``stride`` chunks per shard,
    e.g. the gated fc1's ``[gate_r; up_r]``, are interleaved back to ``[gate; up]``)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    chunks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([chunks[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def split_tp_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of ``full`` (inverse of :func:`gather_tp_tensor`)."""
    if world == 1:
        return full.clone()
    pieces = full.chunk(stride * world, dim=dim)
    return torch.cat([pieces[s * world + rank] for s in range(stride)], dim=dim).clone()


def gather_full_state_dict(module: torch.nn.Module, grads: bool = False, group=None) -> dict:
    """``{name: full tensor}`` for the module's parameters (``grads``: their gradients; Megatron
    DDP's ``main_grad`` when present). Collective over the TP group: call on every TP rank."""
    out = {}
    for name, p in module.named_parameters():
        t = p
        if grads:
            t = getattr(p, "main_grad", None)
            if t is None:
                t = p.grad
            if t is None:
                t = torch.zeros_like(p)
        is_tp, dim, stride = tp_attributes(p)
        out[name] = gather_tp_tensor(t, dim, stride, group) if is_tp else t.detach().clone()
    return out
