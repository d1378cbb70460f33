"""Runs a function on N gloo processes from pytest (or any script) and returns each rank's result.

    def _worker(rank, world_size, tmp):      # module level, so 'spawn' can import it
        initialize_parallel(tp=2, seed=1)
        ...
        return {"loss": float(loss)}         # anything picklable

    results = run_distributed(_worker, 2, str(tmp_path))   # [result of rank 0, rank 1]

Each process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port), one torch
thread by default (N processes share the cores), and CUDA hidden unless ``allow_cuda``. A worker
exception is re-raised in the caller with the worker's traceback; a hung worker fails the call
after ``timeout`` seconds. The 'spawn' start method is used: forking a process whose OpenMP pool
is already running can deadlock.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable, Optional

import torch.multiprocessing as mp

from .state import free_port


class DistributedWorkerError(RuntimeError):
    pass


def _entry(fn, rank, world_size, port, threads, allow_cuda, args, kwargs, results):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if not allow_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # torch is imported in the child only after the environment above is set (CUDA reads it at import).
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        out = fn(rank, world_size, *args, **kwargs)
        try:
            # Plain pickle, by value: torch's queue pickler would share tensor storage through
            # file descriptors that die with this process.
            payload = pickle.dumps(out)
        except Exception as e:  # report it here rather than as a hang in the parent
            raise TypeError(f"worker result is not picklable: {e}") from None
        results.put((rank, True, payload))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads: Optional[int] = 1,
    allow_cuda: bool = False,
    **kwargs: Any,
) -> list:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; returns results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, threads, allow_cuda, args, kwargs, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedWorkerError(
                    f"timed out after {timeout:.0f}s; ranks done: {sorted(got)}; errors: {errors}"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
                if dead and len(got) + len(errors) < world_size:
                    # a rank died without reporting (segfault, os._exit); give peers a moment
                    time.sleep(1.0)
                    if results.empty():
                        raise DistributedWorkerError(
                            f"rank(s) {dead} exited with code(s) "
                            f"{[procs[i].exitcode for i in dead]} without a result; errors: {errors}"
                        )
                continue
            if ok:
                got[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                if len(errors) == 1:
                    deadline = min(deadline, time.monotonic() + 20.0)  # peers may hang in a collective
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise DistributedWorkerError("worker(s) failed:\n" + "\n".join(errors))
    return [got[r] for r in range(world_size)]

