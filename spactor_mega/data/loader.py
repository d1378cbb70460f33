"""This data-parallel rank's training micro-batches, built ahead of the step by DataLoader workers.

Item ``i`` of :class:`MicroBatchDataset` is the ``i``-th micro-batch of :class:`PretrainingSampler`
(same samples, same DP split, from the consumed count), fully built: raw chunks, span corruption,
and the MLM fields iff its step is hybrid. Building is a pure function of the index, so workers
can build the next steps' micro-batches while the engine runs this one (the phase of each is
known in advance from tau), and the batches are the same with any number of workers.
"""

from __future__ import annotations

import signal
from typing import Iterator, Optional

import numpy as np

import torch

from spactor_mega.curriculum import Phase, phase_at
from spactor_mega.data.dataset import (
    PretrainingSampler,
    SpactorBatchBuilder,
    collate_raw,
)


class MicroBatchDataset(torch.utils.data.Dataset):
    """Built micro-batches of ``samples`` in ``sampler``'s order; a step is ``global_batch_size``
    consumed samples, and steps below ``tau`` are hybrid (MLM fields)."""

    def __init__(self, samples: torch.utils.data.Dataset, builder: SpactorBatchBuilder, sampler: PretrainingSampler,
                 global_batch_size: int, tau: float):
        self.samples, self.builder, self.sampler = samples, builder, sampler
        self.global_batch_size, self.tau = global_batch_size, tau

    def __len__(self) -> int:
        return len(self.sampler)

    def step(self, i: int) -> int:
        """The optimizer step that micro-batch ``i`` belongs to."""
        return self.sampler.position(i) // self.global_batch_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = collate_raw([self.samples[j] for j in self.sampler.micro_batch(i)])
        hybrid = phase_at(self.step(i), self.tau) is Phase.HYBRID
        return self.builder(raw["raw"], raw["key"], with_mlm=hybrid)


def _arrays(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A worker's batch as numpy arrays (the same memory), for the trip to the trainer."""
    return {name: tensor.numpy() for name, tensor in batch.items()}


def _ignore_stop_signals(worker_id: int) -> None:
    """A SIGTERM sent to the whole job (a scheduler's preemption) must not kill the input workers:
    torch gives them a handler that exits; the trainer decides when to stop and then ends them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batch_loader(micro_batches: MicroBatchDataset, num_workers: int,
                       prefetch_factor: Optional[int]) -> Iterator[dict[str, torch.Tensor]]:
    """``micro_batches`` in order; with workers, ``prefetch_factor`` micro-batches per worker are
    built ahead from this call on (0 workers: built in this process when asked for). One pass
    over the run, so the workers live as long as the iterator (``persistent_workers`` would
    change nothing).

    Workers are forked whatever the process's default start method (a process started by 'spawn'
    inherits 'spawn'): a forked worker starts at once and shares the dataset's index arrays with
    the trainer, where a spawned one re-imports torch and Megatron and unpickles a copy of them.
    Workers only index memory-mapped tokens and run numpy, never torch's thread pools.

    Batches travel as numpy arrays, pickled through the worker's pipe, and become tensors again
    here without a copy: torch's own transport (a shared-memory file per tensor, its descriptor
    passed over a socket) made the trainer wait twice as long per micro-batch as building it in
    place (demo shape, measured with tools/bench_data.py)."""
    batches = iter(torch.utils.data.DataLoader(
        micro_batches, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_arrays,
        prefetch_factor=prefetch_factor if num_workers else None,
        multiprocessing_context="fork" if num_workers else None,
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    ))
    return ({name: torch.from_numpy(array) for name, array in batch.items()} for batch in batches)
