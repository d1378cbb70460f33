"""Index arrays built once per cache folder and memory-mapped by every process that reads them.

At C4 scale (365M documents, 275M chunks) a dataset's index is several GB; built in memory by
each of a node's ranks it costs GBs of RAM per rank and as many builds. Here the first process
to need an array builds it into a ``.npy`` file; every process then maps it read-only, so the
pages are shared through the page cache and a process touches only the pages it reads.

Who builds: whoever first takes the array's lock file (``flock``). Under Megatron's dataset
builder global rank 0 constructs the datasets first and the other ranks after a barrier, so
with a cache folder every node sees (a shared file system) rank 0 builds alone; with a
node-local folder the first rank of each other node builds, and that node's other ranks wait
on the lock and then map its file. An array is written to a temporary file and renamed into
place, so a crash never leaves a partial cache; a file that cannot be mapped with the expected
shape and dtype (truncated, overwritten) is rebuilt, with a warning naming it.

Megatron's ``GPTDataset`` caches its indices the same way (one rank builds, ``np.load`` with
``mmap_mode='r'`` after a barrier), but inside its own index builder, which is specific to
GPT's document/sample/shuffle indices, so this module does it for any array.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.format import open_memmap

logger = logging.getLogger(__name__)


def cache_key(**inputs) -> str:
    """A file-name-safe digest of every input the array depends on."""
    return hashlib.md5(json.dumps(inputs, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def _mapped(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """``path`` mapped read-only, or None (with a warning) if it is not the expected array."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # numpy's errors for a bad header or a short file
        logger.warning("%s: unreadable index cache (%s); rebuilding it", path, e)
        return None
    if array.shape != shape or array.dtype != dtype:
        logger.warning("%s: index cache holds %s %s, expected %s %s; rebuilding it",
                       path, array.dtype, array.shape, np.dtype(dtype), shape)
        return None
    return array


def _write_atomically(path: Path, shape: tuple[int, ...], dtype: np.dtype, fill: Callable[[np.ndarray], None]):
    """Fills a new ``.npy`` in place (no copy in this process's memory), syncs it, renames it to ``path``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        array = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        fill(array.view(np.ndarray))  # a plain ndarray: numpy's fast paths (shuffle) skip subclasses
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def cached_array(path: Path, shape: tuple[int, ...], dtype, fill: Callable[[np.ndarray], None]) -> tuple[np.ndarray, bool]:
    """``path`` memory-mapped read-only, built first by ``fill`` (which writes every element of
    a zeroed array of ``shape``/``dtype``) if no process has built it. Returns the array and
    whether this call built it."""
    dtype = np.dtype(dtype)
    array = _mapped(path, shape, dtype)
    if array is not None:
        return array, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A file system without flock: every waiting process builds; the rename keeps it correct.
        array = _mapped(path, shape, dtype)  # built while we waited for the lock
        if array is not None:
            return array, False
        logger.info("building index cache %s (%s %s)", path, dtype, shape)
        _write_atomically(path, shape, dtype, fill)
    array = _mapped(path, shape, dtype)
    if array is None:
        raise OSError(f"{path}: the index cache just written cannot be read back")
    return array, True
