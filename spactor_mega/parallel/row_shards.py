"""A batch's rows shared out over a process group and gathered back, autograd-aware.

For work that is replicated over TP but not tensor-split (the generator G's layers): rank r of
the group takes a contiguous share of the rows (dim 0), as even as possible (the first
``n % world`` ranks take one row more; a rank may get none when ``n < world``).

- :func:`split_rows`: forward keeps this rank's rows of a tensor that is the same on every rank;
  backward all-gathers the row gradients, so every rank gets the full input gradient.
- :func:`gather_rows`: forward all-gathers the shares into the full tensor (the same on every
  rank); backward keeps this rank's rows of the output gradient, which must itself be the same on
  every rank (true after Megatron's ``copy_to_tensor_model_parallel_region`` in the MLM head).

Megatron's sequence-parallel scatter/gather do this along dim 0 too, but they require the size
to divide by the group and (for the split-backward gather) even shares; a micro-batch need not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives


def row_shares(rows: int, world: int) -> list[int]:
    """Rows per rank: ``rows`` split as evenly as possible over ``world`` ranks, larger first."""
    base, extra = divmod(rows, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def row_slice(rows: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of ``rows`` (see :func:`row_shares`)."""
    shares = row_shares(rows, world)
    start = sum(shares[:rank])
    return slice(start, start + shares[rank])


def _all_gather_rows(local: torch.Tensor, rows: int, group) -> torch.Tensor:
    """Concatenates every rank's share along dim 0 (shares from :func:`row_shares`)."""
    shares = row_shares(rows, dist.get_world_size(group))
    width = shares[0]  # the largest share
    # all_gather needs equal sizes on every backend (gloo included): pad to the largest share.
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.size(0)] = local
    parts = collectives.all_gather(padded, group)
    return torch.cat([part[:n] for part, n in zip(parts, shares)], dim=0)


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full: torch.Tensor, group):
        ctx.group, ctx.rows = group, full.size(0)
        return full[row_slice(full.size(0), dist.get_rank(group), dist.get_world_size(group))].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad.contiguous(), ctx.rows, ctx.group), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, rows: int, group):
        ctx.group, ctx.rows = group, rows
        return _all_gather_rows(local.contiguous(), rows, group)

    @staticmethod
    def backward(ctx, grad):
        sl = row_slice(ctx.rows, dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        return grad[sl].contiguous(), None, None


def split_rows(full: torch.Tensor, group) -> torch.Tensor:
    """This rank's rows of ``full`` (identical on every rank of ``group``)."""
    if dist.get_world_size(group) == 1:
        return full
    return _SplitRows.apply(full, group)


def gather_rows(local: torch.Tensor, rows: int, group) -> torch.Tensor:
    """Inverse of :func:`split_rows`: all ``rows`` rows, from each rank's share."""
    if dist.get_world_size(group) == 1:
        return local
    return _GatherRows.apply(local, rows, group)
