"""Preemption and wall-clock stops: every rank finishes its step, saves, and the job exits 0.

A cluster asks a job to leave with a signal (SLURM's ``--signal`` before the time limit, a
preemption's SIGTERM, Ctrl-C) that may reach one rank only, at any moment of a step. A rank that
stopped on its own would leave the others blocked in the step's collectives, so the handler only
records the signal, and once per step the ranks all-reduce (MAX) what each has seen: a signal
number and whether ``train.exit_duration_minutes`` has passed on its clock. They agree on the step
after which all of them save and stop. Megatron-LM does the same in its training scripts
(``DistributedSignalHandler``); megatron-core, the library we use, does not ship it, hence this
module.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import torch

from spactor_mega.parallel import collectives

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    """The stop signals this rank received and its wall clock, agreed over all ranks by :meth:`agreed_stop`.

    Both start at construction, at the start of ``train``: a signal during the setup is not lost (the
    run stops after its first step), and the processes forked later (the input pipeline's workers)
    inherit the handlers, so a SIGUSR1 or SIGINT sent to every process of the job leaves them
    running until the trainer shuts them down (not a SIGTERM: torch gives its DataLoader workers a
    SIGTERM handler of their own). :meth:`close` restores the previous handlers."""

    def __init__(self, exit_duration_minutes: Optional[float]):
        self._started = time.monotonic()
        self._limit_minutes = exit_duration_minutes
        self._received = 0  # the first stop signal's number, 0 before any
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self._received = self._received or signum

    def agreed_stop(self) -> Optional[str]:
        """Why every rank stops after this step (the same answer on all of them), or None.
        A collective over the world: every rank calls it once per step."""
        elapsed_minutes = (time.monotonic() - self._started) / 60
        over_time = self._limit_minutes is not None and elapsed_minutes >= self._limit_minutes
        signum, over_time = collectives.max_over_ranks([self._received, int(over_time)])
        if signum:
            return f"{signal.Signals(signum).name} received"
        if over_time:
            return f"train.exit_duration_minutes={self._limit_minutes:g} reached"
        return None


def inject_test_fault(step: int) -> None:
    """Test-only fault injection (tests/training/test_preemption.py), inside step ``step`` (counted
    from 1, as logged and as checkpoints are numbered), after its micro-batches are drawn, on the
    last rank: ``SPACTOR_TEST_SIGNAL_AT_STEP=step`` sends that rank SIGTERM;
    ``SPACTOR_TEST_EXIT_AT_STEP=step`` kills it (``os._exit(1)``) on a torchrun job's first attempt
    only (``TORCHELASTIC_RESTART_COUNT`` 0), so that the restarted job runs through."""
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return
    if os.environ.get("SPACTOR_TEST_SIGNAL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGTERM)
    if (os.environ.get("SPACTOR_TEST_EXIT_AT_STEP") == str(step)
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os._exit(1)
