"""A pool of worker processes over pipes, without threads in the main process (used by preprocessing).

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: their feeder and manager threads
need the GIL that the main process holds while it reads input, which left workers waiting
several ms per task; and results must come back by task number so that the output is written
in input order. :class:`WorkerPool` does both with plain pipes: workers take tasks from one
shared pipe as they get free and answer on a pipe of their own.

A task is any picklable object; ``work(task)`` runs in a worker and returns its (picklable)
result, or raises: the exception is re-raised in the main process, when the result is asked
for, with the worker's traceback as its ``__cause__``.
"""

from __future__ import annotations

import pickle
import signal
import sys
import traceback
from multiprocessing.connection import wait
from typing import Callable, Optional

if sys.platform == "linux":  # pipe sizes are a Linux fcntl; elsewhere pipes keep their size
    import fcntl


def _worker_loop(tasks, lock, results, work: Callable, initializer: Optional[Callable],
                 initargs: tuple, inherited=()) -> None:
    """A worker process: ``(number, task)`` in, ``(number, ok, result or exception)`` out; b"" stops.

    ``inherited``: the main process's pipe ends that a forked worker got a copy of; closed, so
    that the task pipe ends (EOF: the worker exits) when the main process is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, if forked
    for conn in inherited:
        conn.close()
    if initializer is not None:
        initializer(*initargs)
    while True:
        with lock:  # the task pipe is shared: one whole message per reader
            try:
                message = tasks.recv_bytes()
            except EOFError:
                return
        if not message:
            return
        number, task = pickle.loads(message)
        try:
            out = (number, True, work(task))
        except BaseException as e:  # raised by the main process, in task order
            out = (number, False, (e, traceback.format_exc()))
        try:
            data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an unpicklable exception: its text
            data = pickle.dumps((number, False, (RuntimeError(repr(out[2][0])), out[2][1])))
        results.send_bytes(data)


class _WorkerTraceback(Exception):
    """The traceback of an error in a worker process (the ``__cause__`` of the re-raised error)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032  # Linux fcntl commands
_PIPE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size


def _pipe_capacity(conn, grow: bool) -> int:
    """Bytes the pipe behind ``conn`` holds (grown to 1 MB where Linux allows), 0 if unknown."""
    if sys.platform != "linux":
        return 0
    try:
        if grow:
            try:
                fcntl.fcntl(conn.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:  # a lower pipe-max-size or pipe-user-pages limit: keep the default
                pass
        return fcntl.fcntl(conn.fileno(), _F_GETPIPE_SZ)
    except OSError:
        return 0


class WorkerPool:
    """Worker processes running ``work(task)``; results are collected by task number.

    Each worker runs ``initializer(*initargs)`` once first; processes are named
    ``{name}-{i}``. The main process writes a task only when it cannot wait on a worker that
    waits on it: when some worker has no task, or when the tasks possibly still in the pipe,
    this one included, fit in it (1 MB on Linux). Each worker then finds its next task
    already waiting, up to ``depth`` tasks per worker in flight.
    """

    def __init__(self, workers: int, ctx, work: Callable, initializer: Optional[Callable] = None, initargs: tuple = (),
                 depth: int = 2, name: str = "worker"):
        self.workers = workers
        self.limit = depth * workers
        self.procs, self.results = [], []
        self.owner: dict = {}  # result connection or process sentinel -> worker index
        self.unanswered: dict = {}  # task number -> message bytes, in submission order
        self.done: dict = {}  # task number -> (ok, result or exception)
        self.submitted = 0
        task_r, self.tasks = ctx.Pipe(duplex=False)
        self.room = _pipe_capacity(self.tasks, grow=True)
        lock = ctx.Lock()
        forked = ctx.get_start_method() == "fork"
        try:
            for i in range(workers):
                result_r, result_w = ctx.Pipe(duplex=False)
                _pipe_capacity(result_w, grow=True)
                inherited = [self.tasks, *self.results, result_r] if forked else []
                proc = ctx.Process(target=_worker_loop,
                                   args=(task_r, lock, result_w, work, initializer, initargs, inherited),
                                   name=f"{name}-{i}", daemon=True)
                proc.start()
                result_w.close()
                self.procs.append(proc)
                self.results.append(result_r)
                self.owner[result_r] = self.owner[proc.sentinel] = i
        except BaseException:
            self.terminate()
            raise
        finally:
            task_r.close()

    def submit(self, task) -> int:
        """Sends ``task`` (collecting results until there is room for it); returns its number."""
        number = self.submitted
        message = pickle.dumps((number, task), protocol=pickle.HIGHEST_PROTOCOL)
        while not self._fits(len(message)):
            self.collect(block=True)
        try:
            self.tasks.send_bytes(message)
        except OSError as e:  # no reader left
            raise RuntimeError("worker processes exited") from e
        self.unanswered[number] = len(message)
        self.submitted += 1
        return number

    def _fits(self, size: int) -> bool:
        """Whether writing a ``size``-byte task now can never wait on a worker that waits on us.

        Workers read tasks in submission order, so the tasks being worked on are the oldest
        unanswered ones, one per busy worker; the later ones may still sit in the pipe (less
        a page, which a half-read message can hold on to).
        """
        if len(self.unanswered) < self.workers:  # a worker without a task reads whatever comes
            return True
        if len(self.unanswered) >= self.limit:
            return False
        waiting = list(self.unanswered.values())[self.workers :]
        return sum(waiting) + 8 * len(waiting) + size + 8 <= self.room - 4096

    def collect(self, block: bool) -> None:
        """Receives finished results into ``done``; waits for one first when ``block``."""
        for obj in wait(list(self.owner), timeout=None if block else 0):
            i = self.owner[obj]
            if obj is not self.results[i]:  # a process sentinel: workers exit only when told
                raise self._died(i)
            try:
                data = obj.recv_bytes()
            except EOFError:
                raise self._died(i) from None
            number, ok, value = pickle.loads(data)
            del self.unanswered[number]
            self.done[number] = (ok, value)

    def _died(self, i: int) -> RuntimeError:
        self.procs[i].join(1)
        return RuntimeError(f"worker {self.procs[i].name} died (exit code {self.procs[i].exitcode})")

    def result(self, number: int):
        """The result of task ``number`` (waiting for it); a worker's exception is raised here."""
        while number not in self.done:
            self.collect(block=True)
        ok, value = self.done.pop(number)
        if not ok:
            error, text = value
            raise error from _WorkerTraceback(text)
        return value

    def close(self) -> None:
        """Stops the (idle) workers and waits for them."""
        try:
            for _ in self.procs:
                self.tasks.send_bytes(b"")
        except OSError:
            pass
        for proc in self.procs:
            proc.join()
        self._close_pipes()

    def terminate(self) -> None:
        """Stops the workers now (errors, Ctrl-C): SIGTERM, then SIGKILL for a worker still alive.

        A worker forked a moment earlier still has the main process's SIGTERM handler; a SIGTERM
        landing in one of Python's at-fork hooks raises there, is swallowed as "unraisable", and
        the worker would then wait for tasks forever (seen under pytest after torch was imported)."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for conn in [self.tasks, *self.results]:
            conn.close()
