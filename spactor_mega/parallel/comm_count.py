"""Counts the bytes handed to ``torch.distributed`` collectives while a block runs, per process group.

    with CollectiveCounter() as counter:
        engine.train_step(batches, phase)
    counter.bytes(ranks=dp_ranks)                 # {"all_reduce": 1234.0, ...}

What it wraps are the real functions (the calls still run on the real backend, gloo here): for
the duration of the block every module-level reference to them in a loaded module is swapped for a
counting wrapper. A module-level swap is needed because libraries bind some of them under other
names at import time (Megatron's ``dist_reduce_scatter_func = torch.distributed.reduce_scatter_tensor``),
which a patch of ``torch.distributed`` alone would miss. A collective that calls another one (the
deprecated ``_all_gather_base`` calls ``all_gather_into_tensor``) is counted once, at the outermost call.

Payload convention (what a scale model predicts): the full tensor of the collective, whichever
side of it holds that; all-reduce and broadcast: the tensor; all-gather: the gathered output;
reduce-scatter: the input being reduced. What one rank sends on the wire is the payload times
the algorithm's factor (ring all-reduce ``2 (n - 1) / n``, all-gather and reduce-scatter ``(n - 1) / n``).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# name -> (kind reported, the argument holding the full tensor: position and keyword, the position
# of ``group``), as torch's signatures have them
COLLECTIVES: dict[str, tuple[str, int, str, int]] = {
    "all_reduce": ("all_reduce", 0, "tensor", 2),
    "broadcast": ("broadcast", 0, "tensor", 2),
    "all_gather": ("all_gather", 0, "tensor_list", 2),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor", 2),
    "_all_gather_base": ("all_gather", 0, "output_tensor", 2),
    "reduce_scatter": ("reduce_scatter", 1, "input_list", 3),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input", 3),
    "_reduce_scatter_base": ("reduce_scatter", 1, "input", 3),
}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)  # a list of tensors


def _group_ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group if group is not None else c10d._get_default_group()))


class CollectiveCounter:
    """While active (a ``with`` block), ``calls`` lists ``(kind, group ranks, payload bytes)`` for
    every collective this process issues."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self._depth = threading.local()
        self._swapped: list[tuple[object, str, Callable]] = []

    def bytes(self, ranks: Optional[tuple[int, ...]] = None) -> dict[str, int]:
        """Payload bytes per kind, over the calls on a group of exactly ``ranks`` (all if None)."""
        out: dict[str, int] = defaultdict(int)
        for kind, group, nbytes in self.calls:
            if ranks is None or group == tuple(ranks):
                out[kind] += nbytes
        return dict(out)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        kind, position, keyword, group_position = COLLECTIVES[name]
        counter = self

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(counter._depth, "value", 0)
            if depth == 0:
                tensor = kwargs[keyword] if keyword in kwargs else args[position]
                group = kwargs["group"] if "group" in kwargs else (
                    args[group_position] if len(args) > group_position else None)
                counter.calls.append((kind, _group_ranks(group), _nbytes(tensor)))
            counter._depth.value = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth.value = depth

        return counted

    def __enter__(self) -> "CollectiveCounter":
        # by identity: module attributes need not be hashable or comparable
        wrappers = {id(fn): self._wrap(name, fn) for name in COLLECTIVES for fn in (getattr(c10d, name),)}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                wrapper = wrappers.get(id(value))
                if wrapper is not None and value is wrapper.__wrapped__:
                    self._swapped.append((module, attr, value))
                    setattr(module, attr, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for module, attr, original in reversed(self._swapped):
            setattr(module, attr, original)
        self._swapped.clear()
