"""Writes Megatron-Core's indexed dataset format (``<prefix>.bin`` + ``<prefix>.idx``), numpy only.

Why hand-written: Megatron's ``IndexedDatasetBuilder`` is only reachable by importing
``megatron.core.datasets.indexed_dataset``, which runs ``megatron/core/__init__`` (tensor
parallel, transformer config, torch): 5-8 s of CPU plus over a second of interpreter
shutdown, longer than preprocessing a small corpus end to end. The format itself is a few
arrays, so :class:`IndexedDatasetWriter` writes it here, and its files are byte-identical to
``IndexedDatasetBuilder``'s for the same documents and dtype (``tests/data/
test_indexed_writer.py`` checks that against Megatron). Readers keep using Megatron's
``IndexedDataset``.

Layout (Megatron-Core ``indexed_dataset.py``, ``_IndexWriter``; all little-endian):

- ``.bin``: every sequence's tokens back to back, in the index's dtype.
- ``.idx``: ``b"MMIDIDX\\x00\\x00"``; version ``<Q`` = 1; dtype code ``<B`` (:data:`DTYPE_CODES`);
  sequence count ``<Q``; document count ``<Q`` (documents + 1); then the int32 sequence
  lengths, the int64 byte offset of each sequence in ``.bin``, and the int64 document indices
  (sequence index where each document starts, beginning with 0, ending with the sequence
  count). Multimodal datasets (an int8 mode per sequence) are not written.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence, Union

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

# Megatron-Core's DType enum: numpy dtype name -> the code stored in the .idx
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7,
               "uint16": 8}


def optimal_dtype(cardinality: Optional[int]) -> type:
    """Megatron's ``DType.optimal_dtype``: uint16 below 65,500 distinct ids, else int32."""
    if cardinality is not None and cardinality < 65500:
        return np.uint16
    return np.int32


class IndexedDatasetWriter:
    """Builds ``.bin``/``.idx`` like Megatron's ``IndexedDatasetBuilder(bin_path, dtype)``.

    Tokens go to ``bin_path`` as they are added; :meth:`finalize` writes the index to
    ``idx_path`` and closes the data file. :meth:`close` abandons a dataset (closes the data
    file without an index). Values are cast to ``dtype`` as Megatron does (``np.array(x,
    dtype)``): pick it with :func:`optimal_dtype` of the vocabulary size.
    """

    def __init__(self, bin_path: str, dtype: Union[type, np.dtype, str] = np.int32) -> None:
        self.dtype = np.dtype(dtype).type  # a scalar type, as Megatron keeps it
        if np.dtype(self.dtype).name not in DTYPE_CODES:
            raise ValueError(f"dtype {np.dtype(dtype).name} cannot be stored in an indexed dataset; "
                             f"use one of {', '.join(DTYPE_CODES)}")
        self.bin_path = bin_path
        self.data_file = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []  # int32 sequence lengths, in pieces
        self._doc_ends: list[np.ndarray] = []  # int64 sequence count after each document
        self.sequences = 0
        self.documents = 0
        self.tokens = 0

    # Adding ----------------------------------------------------------------------------
    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """One document: ``tokens`` (all its sequences back to back) and its sequence lengths."""
        array = self._as_dtype(tokens)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self._check(array, lengths)
        self._write(array)
        self._lengths.append(lengths.astype(np.int32))
        self.sequences += len(lengths)
        self._doc_ends.append(np.array([self.sequences], dtype=np.int64))
        self.documents += 1

    def add_documents(self, tokens, lengths) -> None:
        """Many one-sequence documents at once: ``tokens`` back to back, ``lengths[i]`` each.

        The same files as ``add_document(doc_i, [len_i])`` for each document, in one write.
        """
        array = self._as_dtype(tokens)
        lengths = np.asarray(lengths).reshape(-1)
        if not len(lengths):
            if len(array):
                raise ValueError(f"{len(array)} tokens given without lengths")
            return
        self._check(array, lengths)
        self._write(array)
        self._lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(np.arange(self.sequences + 1, self.sequences + len(lengths) + 1, dtype=np.int64))
        self.sequences += len(lengths)
        self.documents += len(lengths)

    def _as_dtype(self, tokens) -> np.ndarray:
        if isinstance(tokens, np.ndarray) and tokens.dtype == self.dtype:
            return tokens.reshape(-1)
        return np.array(tokens, dtype=self.dtype).reshape(-1)  # as Megatron casts

    @staticmethod
    def _check(array: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths) and lengths.min() < 0:
            raise ValueError("sequence lengths must be >= 0")
        if int(lengths.sum()) != len(array):
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())}, but {len(array)} tokens were given")
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence is longer than the int32 lengths of the index allow")

    def _write(self, array: np.ndarray) -> None:
        if len(array):
            self.data_file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            self.tokens += len(array)

    # Finishing -------------------------------------------------------------------------
    def finalize(self, idx_path: str) -> None:
        """Closes the data file and writes the index to ``idx_path``."""
        self.data_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= np.dtype(self.dtype).itemsize
        doc_indices = np.concatenate([np.zeros(1, np.int64)] + self._doc_ends)
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[np.dtype(self.dtype).name]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_indices)))
            for array in (lengths, pointers, doc_indices):
                f.write(memoryview(array).cast("B"))

    def close(self) -> None:
        """Closes the data file without writing an index (abandoned output)."""
        self.data_file.close()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
