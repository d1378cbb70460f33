"""A hang watchdog: when a training step runs longer than ``train.hang_factor`` times the median
step so far, every rank prints its own Python stacks to stderr, each line led by its rank.

A rank that hangs (a dead peer, a deadlocked collective, a stuck file system) stalls the others
in their next collective, so their steps overrun too and each prints where it waits: the stacks
together show which rank is elsewhere. Megatron and torch offer the process-group timeout
(``train.distributed_timeout_minutes``), which kills a run after minutes without saying where each
rank was; this is the diagnosis before it. When that timeout fires on NCCL, torch's flight recorder
(enabled by launch/env.sh) writes each rank's last collectives into the run's folder
(:func:`point_flight_recorder_dump`).

A Python thread, not ``faulthandler.dump_traceback_later``: faulthandler writes straight to the
file descriptor and cannot put the rank in front of each line, and the waits that hang a
distributed step (collectives, sleeps, I/O) release the GIL, so the thread gets to run.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, TextIO

# Steps timed before the watchdog arms: the median of fewer is mostly start-up.
MIN_STEPS = 3

# Test-only fault injection: "K" or "K:RANK" makes step K (1-based) sleep on that rank (every rank
# without one) until this rank's watchdog has printed, then two more thresholds, so that the ranks
# waiting for it in a collective pass their own thresholds as well.
TEST_SLEEP_ENV = "SPACTOR_TEST_SLEEP_AT_STEP"

# Where NCCL's flight recorder writes a rank's dump (this prefix + the rank), in torch 2.13's names,
# the one it reads first leading
FLIGHT_RECORDER_DUMP_ENV = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def point_flight_recorder_dump(save_dir: str, cuda: bool) -> Optional[str]:
    """On CUDA, unless the user named a file: the flight recorder's dumps go to
    ``<run>/nccl_trace/rank_<N>`` beside ``train.save_dir`` (torch's default, /tmp/nccl_trace_rank_,
    is each node's local disk, gone with the job). Set before the process groups exist; torch reads
    it when it dumps. Returns the prefix in force (None off CUDA)."""
    if not cuda:
        return None
    named = [os.environ[name] for name in FLIGHT_RECORDER_DUMP_ENV if os.environ.get(name)]
    if named:
        return named[0]
    folder = Path(save_dir).resolve().parent / "nccl_trace"
    folder.mkdir(parents=True, exist_ok=True)  # torch opens the file, it makes no folder
    os.environ[FLIGHT_RECORDER_DUMP_ENV[1]] = str(folder / "rank_")
    return os.environ[FLIGHT_RECORDER_DUMP_ENV[1]]


class HangWatchdog:
    """Arm with :meth:`start_step` at the start of each step, disarm with :meth:`end_step`."""

    def __init__(self, hang_factor: float, rank: int, stream: Optional[TextIO] = None):
        self.hang_factor = hang_factor
        self.rank = rank
        self.stream = stream
        self.durations: list[float] = []
        self.fired = threading.Event()  # set after each printout (tests, the test-only sleep)
        self._condition = threading.Condition()
        self._deadline: Optional[float] = None
        self._started = 0.0
        self._step = 0
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._sleep_at = _parse_test_sleep(os.environ.get(TEST_SLEEP_ENV, ""), rank)

    @property
    def threshold(self) -> Optional[float]:
        """Seconds after which a step counts as hung; None while off or before :data:`MIN_STEPS` steps."""
        if self.hang_factor <= 0 or len(self.durations) < MIN_STEPS:
            return None
        return self.hang_factor * statistics.median(self.durations)

    def start_step(self, step: int) -> None:
        threshold = self.threshold
        with self._condition:
            self._started, self._step = time.monotonic(), step
            if threshold is not None:
                self._deadline = self._started + threshold
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="spactor-hang-watchdog", daemon=True)
                    self._thread.start()
                self._condition.notify()
        if step == self._sleep_at:
            self.fired.clear()
            self.fired.wait(timeout=120 if threshold is not None else 0)
            time.sleep(2 * (threshold or 0))

    def end_step(self) -> None:
        with self._condition:
            self.durations.append(time.monotonic() - self._started)
            self._deadline = None

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self._deadline = None  # once per step
                self._print_stacks(self._step, time.monotonic() - self._started)
                self.fired.set()

    def _print_stacks(self, step: int, elapsed: float) -> None:
        median = statistics.median(self.durations)
        lines = [f"watchdog: step {step} has run {elapsed:.1f} s, more than train.hang_factor={self.hang_factor:g} "
                 f"x the median step {median:.3g} s; this rank's Python stacks:"]
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue  # this thread
            lines.append(f"Thread {names.get(ident, ident)} (most recent call last):")
            lines.extend(line for entry in traceback.format_stack(frame) for line in entry.rstrip("\n").split("\n"))
        stream = self.stream or sys.stderr
        stream.write("".join(f"[rank {self.rank}] {line}\n" for line in lines))
        stream.flush()


def _parse_test_sleep(value: str, rank: int) -> Optional[int]:
    if not value:
        return None
    step, _, only_rank = value.partition(":")
    return int(step) if not only_rank or int(only_rank) == rank else None
