"""Checks that the indexed datasets can serve the run, made when they are opened and before any
model is built: each failure is one line naming the file and the fix.

Megatron's ``IndexedDataset`` reads the ``.idx`` header and memory-maps the ``.bin`` without
comparing them (a short ``.bin`` fails at the first sample past its end, deep in a step), and its
dataset builder repeats a split as often as the requested samples need, so these are ours.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np

from spactor_mega.errors import UserError


class DataError(UserError):
    """Data that cannot be read or used; the message names the file and the fix."""

    same_on_every_rank = True


def check_bin_matches_index(bin_path: Path, idx_path: Path, pointers: np.ndarray, lengths: np.ndarray,
                            itemsize: int) -> None:
    """The ``.bin`` holds exactly the tokens its ``.idx`` describes: shorter is a truncated file,
    longer the ``.bin`` of another dataset (or of another run of preprocessing) beside this index."""
    need = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    have = bin_path.stat().st_size
    if have < need:
        raise DataError(f"{bin_path}: truncated ({have} bytes, index needs {need}); rebuild with `spactor preprocess`")
    if have > need:
        raise DataError(f"{bin_path}: {have} bytes, but its index {idx_path.name} describes {need}: the two files are "
                        "not from the same `spactor preprocess` run; rebuild both with `spactor preprocess`")


def check_passes(train_set, max_epochs: float) -> None:
    """Each dataset of the training blend (a ``SpactorDataset``, or Megatron's ``BlendedDataset`` of
    them) is read at most ``max_epochs`` times over the run's samples."""
    for dataset in getattr(train_set, "datasets", [train_set]):
        passes = len(dataset) / dataset.chunks_per_epoch
        if passes > max_epochs:
            raise DataError(
                f"{dataset.dataset_path}: the run needs {len(dataset)} samples of its {dataset.index_split.name} split, "
                f"which holds {dataset.chunks_per_epoch} ({passes:.1f} passes, data.max_epochs={max_epochs:g}); add data, "
                "lower train.steps or train.global_batch_size, or raise data.max_epochs to repeat it"
            )
