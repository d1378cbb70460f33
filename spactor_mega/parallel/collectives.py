"""The one owner of the collectives our own code issues: each tensor goes over a group on the device
that group's backend communicates on.

NCCL reduces CUDA tensors only ("No backend type associated with device type cpu"); gloo takes CPU
tensors (and, for a few ops, CUDA ones through a host copy). A flag or a metric built with
``torch.tensor(...)`` lands on the CPU, which works on a CPU test run and kills the first GPU run
with DP > 1 or PP > 1. Every collective in ``spactor_mega`` therefore passes through this module
(``tests/test_architecture.py`` fails on a direct ``torch.distributed`` collective elsewhere):
it asks the group for its backend, moves the tensor there (a no-op for activations, which already
live there) and, for in-place ops, copies the result back.

torch.distributed offers the collectives but not the device choice (``get_backend`` names the
backend, nothing maps it to a device); Megatron-Core's helpers assume CUDA throughout. Hence this
small module. ``group=None`` is the world group, as in torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def group_device(group=None) -> torch.device:
    """The device ``group``'s backend communicates on: this rank's CUDA device for NCCL, the CPU
    for gloo (a group with both, e.g. ``cpu:gloo,cuda:nccl``, takes CPU tensors: no copy needed)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _active(group) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduces ``tensor`` in place (on any device) over ``group`` and returns it."""
    if not _active(group):
        return tensor
    device = group_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (equal shapes), in group rank order, on ``tensor``'s device."""
    if not _active(group):
        return [tensor]
    device = group_device(group)
    local = tensor.contiguous() if tensor.device == device else tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return parts if local.device == tensor.device else [p.to(tensor.device) for p in parts]


def barrier(group=None) -> None:
    """Waits for every rank of ``group``. Under NCCL, on this rank's device (without
    ``device_ids`` NCCL guesses it, and warns)."""
    if not _active(group):
        return
    device = group_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when ``flag`` is True on any of them."""
    return bool(max_over_ranks([int(flag)], group)[0])


def max_over_ranks(values: Sequence[float], group=None) -> list:
    """The element-wise maximum of ``values`` over ``group`` (one collective): ints stay ints
    (int64), floats are exact (float64; the maximum of equal values is that value)."""
    if not _active(group):
        return list(values)
    floats = any(isinstance(v, float) for v in values)
    t = torch.tensor(list(values), dtype=torch.float64 if floats else torch.int64, device=group_device(group))
    dist.all_reduce(t, op=ReduceOp.MAX, group=group)
    return t.tolist()


def mean_over_ranks(values: torch.Tensor, group=None) -> torch.Tensor:
    """``values`` averaged over ``group`` (a new tensor on ``values``' device)."""
    out = values.clone()
    if not _active(group):
        return out
    return all_reduce_(out, group=group).div_(dist.get_world_size(group))
