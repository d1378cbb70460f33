"""Megatron's distributed optimizer's state in a checkpoint, written by every rank itself.

Each DP rank's ``DistributedOptimizer`` steps a contiguous range of each parameter's flattened
elements (its shard of a gradient bucket): the fp32 main copy and both Adam moments of that range.
Every rank saves its ranges as rectangular pieces of the parameter's global tensor, under the same
keys and global shapes as Megatron's per-parameter formats (``optimizer.state.<state>.<param key>``),
so a run under another TP/PP/DP layout reads exactly its own ranges back (torch DCP reshards
rectangular pieces) and no rank holds more than its own shard.

Written by hand because megatron-core 0.16.1 offers no such format that works: its per-rank
"fully_sharded_model_space" stores each range as a ``ShardedTensor`` with ``flattened_range``,
which the same version's ``ShardedTensor`` refuses ("flattened_range is not supported");
"fully_reshardable" gathers the whole DP group's state on DP rank 0 (an XL model's fp32 parameters
and moments in one host's memory per save); "dp_reshardable" reshards over DP only. Checkpoints
written in "fully_reshardable" (whole tensors under the same keys) load through the same template.
"""

from __future__ import annotations

import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

STATES = ("param", "exp_avg", "exp_avg_sq")  # the fp32 main copy and Adam's moments (Megatron's names)
SHARDING_TYPE = "per_rank_pieces"  # the state dict's param_state_sharding_type (Megatron's own entry)


def flat_range_pieces(shape: tuple, start: int, end: int) -> list[tuple[tuple, tuple]]:
    """``[(offset, shape)]``: rectangular blocks of a row-major tensor of ``shape`` that cover its
    flattened elements ``[start, end)`` in order (at most ``2 * len(shape) - 1`` of them)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))]
    row_size = math.prod(shape[1:])
    first, head = divmod(start, row_size)
    last, tail = divmod(end, row_size)

    def within_row(row: int, lo: int, hi: int) -> list:
        return [((row, *offset), (1, *size)) for offset, size in flat_range_pieces(shape[1:], lo, hi)]

    if first == last:
        return within_row(first, head, tail)
    pieces = []
    if head:
        pieces += within_row(first, head, row_size)
        first += 1
    if last > first:
        pieces.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if tail:
        pieces += within_row(last, 0, tail)
    return pieces


def _placements(sharded, param: torch.Tensor) -> list[tuple[int, ShardedTensor]]:
    """``[(flat offset in param, ShardedTensor)]``: where the parameter's local elements go in the
    checkpoint: its own tensor, or the tensors its factory builds (Megatron's gated-MLP weight is
    saved as two halves, each a contiguous part of the parameter)."""
    built = list(nested_values(sharded.build())) if isinstance(sharded, ShardedTensorFactory) else [sharded]
    out = []
    for placed in built:
        same_storage = placed.data.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        assert placed.data.is_contiguous() and same_storage, f"{placed.key}: not a contiguous part of its parameter"
        out.append((placed.data.storage_offset() - param.storage_offset(), placed))
    return out


def _pieces(key: str, placed: ShardedTensor, flat: torch.Tensor, start: int, replica_id) -> list[ShardedTensor]:
    """``flat``: a state tensor of ``placed``'s flattened elements ``[start, start + numel)``, as
    ShardedTensors of rectangular pieces of the global tensor (views of ``flat``). Axes that
    ``placed`` prepends (a stacked layer's index) are the pieces' own leading axes of size 1:
    torch DCP's checks of a piece that is not on a regular grid expect a size on every axis."""
    pieces, used = [], 0
    leading = placed.global_offset[:placed.prepend_axis_num]
    for offset, shape in flat_range_pieces(tuple(placed.local_shape), start, start + flat.numel()):
        n = math.prod(shape)
        shape = (1,) * len(leading) + shape
        global_offset = tuple(g + o for g, o in zip(placed.global_offset[len(leading):], offset))
        pieces.append(ShardedTensor(
            key=key, data=flat[used:used + n].view(shape), dtype=flat.dtype, local_shape=shape,
            global_shape=placed.global_shape, global_offset=(*leading, *global_offset),
            axis_fragmentations=None, replica_id=replica_id))
        used += n
    return pieces


def _owned_ranges(optimizer):
    """``(model parameter, start, end)`` for each range of a parameter this rank's optimizer steps
    (Megatron's own walk over its buckets' parameter maps)."""
    for buffer_ranges in optimizer.gbuf_ranges:
        for bucket_ranges in buffer_ranges.values():
            for bucket_range in bucket_ranges:
                for param, ranges in bucket_range["param_map"].items():
                    yield param, ranges["param"].start, ranges["param"].end


def sharded_param_state(optimizer, model_state: dict) -> dict:
    """This rank's part of ``optimizer``'s (one ``DistributedOptimizer``) per-parameter state, as
    ShardedTensors viewing the live tensors: ``{state: [pieces]}``, in the order of
    :func:`_owned_ranges`."""
    tensors, _ = extract_sharded_tensors_and_factories(model_state)
    by_param = {id(sharded.data): sharded for sharded in nested_values(tensors)}
    out = {name: [] for name in STATES}
    for param, start, end in _owned_ranges(optimizer):
        sharded = by_param[id(param)]
        assert len(sharded.replica_id) == 3, sharded  # (PP, TP, DP): each DP rank holds its own range
        replica_id = (*sharded.replica_id[:2], optimizer.distributed_optimizer_instance_id)
        state = optimizer._get_main_param_and_optimizer_states(param)
        for placed_at, placed in _placements(sharded, param):
            lo, hi = max(start, placed_at), min(end, placed_at + placed.data.numel())
            if lo >= hi:
                continue
            for name in STATES:
                flat = state[name].view(-1)[lo - start:hi - start]
                out[name] += _pieces(f"optimizer.state.{name}.{placed.key}", placed, flat, lo - placed_at, replica_id)
    return out


@torch.no_grad()
def load_param_state(optimizer, loaded: dict, model_state: dict) -> None:
    """Copies ``loaded`` (what a load of :func:`sharded_param_state` returned) into ``optimizer``'s
    live state tensors, piece by piece in the same order: megatron-core's torch strategy loads into
    the template's views in place (then this copies each onto itself), which its other load
    strategies do not promise."""
    for name, pieces in sharded_param_state(optimizer, model_state).items():
        for piece, tensor in zip(pieces, loaded[name], strict=True):
            piece.data.copy_(tensor)
