"""Process groups and seeding: one call to set up torch.distributed + Megatron-Core's parallel state.

Megatron offers ``parallel_state.initialize_model_parallel`` (TP/PP/DP groups) and
``tensor_parallel.model_parallel_cuda_manual_seed`` (RNG tracker); this module adds what a
trainer must do around them: ``torch.distributed`` init from the torchrun environment (or a
one-process group when there is none), gloo on CPU / nccl on GPU, the CPU compatibility layer,
and seeding of Python, NumPy and torch's default generator.

Seeding convention: the default torch generator gets ``seed`` on *every* rank (weights do not
depend on it: :mod:`spactor_mega.model.init` draws each from its own keyed generator). Megatron's tracker
gets the usual ``seed + 2718 + tp_rank`` model-parallel state for dropout inside TP regions, and
one more per-TP-rank state, :data:`ROW_SHARD_RNG`, for layers that run different rows on each TP
rank (G's): their dropout must not advance the default generator by different amounts on
different TP ranks, since that generator drops TP-replicated activations and must stay in step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from . import collectives
from .cpu_compat import apply_cpu_compat

_OWNS_PROCESS_GROUP = False

# RNG-tracker state for row-sharded work (see the module docstring); fork it around such work.
ROW_SHARD_RNG = "row-shard-rng"


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(backend: Optional[str], timeout_s: float) -> None:
    global _OWNS_PROCESS_GROUP
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if launched:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    else:
        # No launcher: a one-process group so that Megatron's collectives still work.
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _OWNS_PROCESS_GROUP = True


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy, torch's default generator and Megatron's RNG tracker."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # An offset unused by Megatron's states (seed, seed + 2718 + tp_rank, seed + 1024 + ...).
    tensor_parallel.get_cuda_rng_tracker().add(ROW_SHARD_RNG, seed + 3 * 2718 + parallel_state.get_tensor_model_parallel_rank())


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    *,
    vp: int = 1,
    backend: Optional[str] = None,
    timeout_s: float = 600.0,
) -> None:
    """Initialises torch.distributed (if needed), Megatron's TP/PP/DP groups and the RNGs.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK (torchrun); without them it makes a
    one-process group. ``world_size`` must be a multiple of ``tp * pp`` (the plan's validation
    refuses other layouts); DP is the rest. ``vp``: virtual pipeline stages (model chunks) per
    pipeline rank (Megatron's interleaved schedule). ``timeout_s``: how long any collective waits for
    a rank that does not come (then it fails, and the launcher can restart the job).
    """
    apply_cpu_compat()
    _init_process_group(backend, timeout_s)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        distributed_timeout_minutes=timeout_s / 60,  # its TP/PP/DP groups: the same timeout as the world's
    )
    apply_cpu_compat()  # modules imported by initialize_model_parallel
    seed_everything(seed)


@contextlib.contextmanager
def single_process_parallel(seed: int = 1234):
    """A one-process gloo group with Megatron TP = PP = 1 in *this* process, for the duration of a
    ``with`` block: what single-process tools (``spactor convert``, dist-checkpoint readers, test
    fixtures) need. Reuses a one-process group someone else created; tears down only what it set up."""
    owned = not dist.is_initialized()
    if not owned and dist.get_world_size() != 1:
        raise RuntimeError("single_process_parallel: a multi-process group is already initialised")
    initialize_parallel(tp=1, pp=1, seed=seed)
    try:
        yield
    finally:
        destroy_parallel(destroy_process_group=owned)


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tears down Megatron's groups and, when this module created it, the process group."""
    global _OWNS_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and _OWNS_PROCESS_GROUP and dist.is_initialized():
        collectives.barrier()  # a rank leaving early makes a peer's last collective abort
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False
        _SELF_GROUPS.clear()


_SELF_GROUPS: dict = {}


def self_group():
    """A process group holding only this rank (for modules built "as if TP were 1", e.g. G).

    Created with ``use_local_synchronization`` so only this rank takes part: safe to call from code
    that runs on some ranks only (a pipeline stage). Cached per (world rank, world size).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    key = (rank, world)
    group = _SELF_GROUPS.get(key)
    if group is None:
        group = dist.new_group(ranks=[rank], use_local_synchronization=True)
        _SELF_GROUPS.clear()  # groups of a previous world are gone
        _SELF_GROUPS[key] = group
    return group
