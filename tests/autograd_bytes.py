"""What autograd keeps for backward, in bytes: the measurement the memory tests and benches share."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_bytes(fn: Callable[[], object], excluded: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (each storage
    once, however many views of it are saved), those of ``excluded`` (parameters) left out."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    storages = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(storages.values())
