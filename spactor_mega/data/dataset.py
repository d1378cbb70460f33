"""SpacTor samples over Megatron indexed datasets, and their batches.

``SpactorDataset`` is a ``MegatronDataset``, so Megatron's ``BlendedMegatronDatasetBuilder``
gives blending of corpora by weight, train/valid/test splits and cached indices. A sample is
a raw chunk of the split's documents concatenated in order (EOS between documents, from
preprocessing), cut into chunks of T5's raw length (568 tokens for 512 inputs) and visited
in a per-epoch shuffled order, plus a random key. Both are pure functions of
(seed, dataset, sample index), so any rank can build any sample, and resuming is a matter
of the consumed-samples count.

``SpactorBatchBuilder`` turns a batch of raw chunks into model inputs: span corruption for
both stages, MLM positions only when the step is hybrid (stage 1).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Megatron warns about missing apex/TE on import
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        BlendedMegatronDatasetConfig,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.megatron_dataset import MegatronDataset
    from megatron.core.datasets.utils import Split

from spactor_mega.data.index_cache import cache_key, cached_array
from spactor_mega.data.permutation import Permutation
from spactor_mega.data.span_corruption import (
    SpanCorruption,
    mlm_capacity,
    mlm_positions,
    sample_keys,
)
from spactor_mega.data.special_tokens import PAD_ID, special_mask
from spactor_mega.data.validation import DataError, check_bin_matches_index

logger = logging.getLogger(__name__)


@dataclass
class SpactorDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config; ``sequence_length`` is the raw chunk length (568 for 512)."""


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """Opens ``prefix.bin/.idx`` with a clear error for missing, truncated or corrupt files."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"{path}: indexed dataset file not found; build it with `spactor preprocess`")
    try:
        dataset = IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as e:  # Megatron raises assertion/struct/value errors on bad headers
        raise DataError(f"{idx}: not a readable Megatron index ({type(e).__name__}: {e}); rebuild with `spactor preprocess`") from None
    check_bin_matches_index(bin_, idx, dataset.index.sequence_pointers, dataset.index.sequence_lengths,
                            np.dtype(dataset.index.dtype).itemsize)
    return dataset


# Elements per temporary array when building an index (32 MB of int64): building the index of
# C4's 365M documents then takes about as much private memory as that of a small corpus.
INDEX_BLOCK = 1 << 22


class SpactorDataset(MegatronDataset):
    """Raw T5 chunks of one indexed dataset's split, shuffled per epoch.

    The index (each document's token offset in the split) lives in a ``.npy`` file of
    ``config.path_to_cache`` (``data.cache_dir``; unset: Megatron's default for ``GPTDataset``,
    ``<prefix>/cache/SpactorDataset_indices``), built by one process and memory-mapped by all
    (``index_cache``), its name a digest of what it depends on. Each epoch's chunk order is
    computed per sample (``permutation``), so it is neither built nor stored.
    """

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.chunk_length = config.sequence_length
        self.documents = _document_range(indices)
        self.cache_dir = Path(
            config.path_to_cache or Path(dataset.path_prefix, "cache", f"{type(self).__name__}_indices")
        )
        idx = Path(dataset.path_prefix + ".idx").stat()
        self.index_key = cache_key(
            layout=1,  # bump when the files' content for the same inputs changes
            prefix=str(Path(dataset.path_prefix).resolve()), idx_bytes=idx.st_size, idx_mtime_ns=idx.st_mtime_ns,
            documents=[self.documents.start, self.documents.stop],
        )
        self.index_builds = 0  # index files this object built rather than mapped (tests, tools/bench_data_index.py)
        self.offsets = self._cached(f"{self.index_key}-offsets.npy", len(self.documents) + 1, np.int64, self._fill_offsets)
        self.chunks_per_epoch = int(self.offsets[-1]) // self.chunk_length
        if self.chunks_per_epoch == 0:
            raise DataError(
                f"{dataset_path}: the {index_split.name} split has {int(self.offsets[-1])} tokens, fewer than one "
                f"chunk of {self.chunk_length}; add data or change data.split"
            )
        self.length = num_samples if num_samples is not None else self.chunks_per_epoch
        # A per-dataset salt keeps the random keys of blended datasets apart.
        self.salt = int(self.unique_description_hash[:15], 16)
        self._epoch_orders: dict[int, Permutation] = {}

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        return low_level_dataset.sequence_lengths.shape[0]

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: SpactorDatasetConfig) -> IndexedDataset:
        return open_indexed_dataset(dataset_path)

    def __len__(self) -> int:
        return self.length

    def _cached(self, name: str, length: int, dtype, fill) -> np.ndarray:
        path = self.cache_dir / name
        try:
            array, built = cached_array(path, (length,), dtype, fill)
        except OSError as e:
            raise DataError(
                f"{path}: cannot write the dataset index cache ({e.strerror or e}); set data.cache_dir to a writable folder"
            ) from None
        self.index_builds += built
        return array

    def _fill_offsets(self, offsets: np.ndarray) -> None:
        """Token offset of each split document in the split's concatenation, and the total."""
        lengths = self.dataset.sequence_lengths[self.documents.start : self.documents.stop]  # a view of the mapped .idx
        offsets[0] = 0
        # In blocks: cumsum copies its int32 input to int64 first (8 bytes per document at once).
        for first in range(0, len(lengths), INDEX_BLOCK):
            last = min(first + INDEX_BLOCK, len(lengths))
            np.cumsum(lengths[first:last], dtype=np.int64, out=offsets[first + 1 : last + 1])
            offsets[first + 1 : last + 1] += offsets[first]

    def epoch_order(self, epoch: int) -> Permutation:
        """The chunk order of one epoch: a permutation seeded by (seed, salt, epoch), computed
        per position (``permutation``): nothing to build, store or wait for at an epoch's start."""
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = Permutation(self.chunks_per_epoch, [self.config.random_seed, self.salt, epoch])
            self._epoch_orders = {epoch: order}  # consumption is sequential: keep one epoch's keys
        return order

    def raw_chunk(self, chunk: int) -> np.ndarray:
        """Tokens ``[chunk * L, (chunk + 1) * L)`` of the split's concatenated documents."""
        start = chunk * self.chunk_length
        out = np.empty(self.chunk_length, dtype=np.int64)
        doc = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled, offset = 0, start - int(self.offsets[doc])
        while filled < self.chunk_length:
            take = min(self.chunk_length - filled, int(self.offsets[doc + 1] - self.offsets[doc]) - offset)
            if take > 0:
                out[filled : filled + take] = self.dataset.get(self.documents[doc], offset, take)
                filled += take
            doc, offset = doc + 1, 0
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        idx = int(idx)
        epoch, position = divmod(idx, self.chunks_per_epoch)
        chunk = self.epoch_order(epoch)[position]
        key = sample_keys(self.config.random_seed, np.array([idx]), self.salt)[0]
        return {"raw": self.raw_chunk(chunk), "key": np.uint64(key)}


def _document_range(indices) -> range:
    """A split's documents as a range: ``build_datasets``'s builder passes one, Megatron's own
    ``np.arange(begin, end)``; a range costs nothing per document where an array costs 4-8 bytes each."""
    if len(indices) == 0:
        return range(0)
    first, last = int(indices[0]), int(indices[-1])
    if last - first + 1 != len(indices):
        raise ValueError(f"SpactorDataset needs a contiguous run of documents, got {len(indices)} in [{first}, {last}]")
    return range(first, last + 1)


class RangeSplitBuilder(BlendedMegatronDatasetBuilder):
    """Megatron's blended dataset builder, handing each split its documents as a ``range``.

    Megatron's ``_build_megatron_dataset_splits`` passes a split's documents to the dataset as
    ``np.arange(begin, end, dtype=int32)``: 1.4 GB at once on every rank for C4 en's 365M
    documents, the largest transient of the index build, though ``SpactorDataset`` only needs
    the bounds. Megatron has no hook for that array, so this is the method with a range in its
    place; the rest is Megatron's: the low-level dataset, the split bounds (the same rounding),
    ``build_generic_dataset``'s rank-0-first construction. Left out: the branch for ranks
    ``is_built_on_rank`` excludes (``build_datasets`` builds on every rank) and GPT's
    ``fast_cache_load``."""

    def _build_megatron_dataset_splits(self, dataset_path, split, sizes, synchronize_ranks=True):
        low_level_dataset = self.cls.build_low_level_dataset(dataset_path, self.config)
        count = float(self.cls.numel_low_level_dataset(low_level_dataset))
        return [
            None if bounds is None else self.build_generic_dataset(
                self.cls, self.is_built_on_rank, synchronize_ranks, low_level_dataset, dataset_path,
                range(int(round(bounds[0] * count)), int(round(bounds[1] * count))), sizes[i], kind, self.config,
            )
            for i, (bounds, kind) in enumerate(zip(split, Split))
        ]


def collate_raw(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks raw chunks and keys; the corruption itself runs batched in the builder."""
    return {
        "raw": np.stack([s["raw"] for s in samples]),
        "key": np.array([s["key"] for s in samples], dtype=np.uint64),
    }


@dataclass
class SpactorBatchBuilder:
    """Raw chunks -> the model's batch (span corruption; MLM fields in hybrid steps).

    Batch fields (torch, batch-first): ``enc_tokens`` [B, S_enc] int64, ``enc_mask`` bool,
    ``dec_input`` / ``labels`` [B, S_dec] int64, ``dec_loss_mask`` float32; hybrid steps add
    ``mlm_positions`` / ``mlm_targets`` [B, M] int64, ``mlm_weights`` [B, M] float32 and
    ``sample_keys`` [B] int64 (each sample's random key, bits of the uint64: G's sampling noise
    is keyed by it, so a sample's replacements do not depend on the batch layout).
    """

    corruption: SpanCorruption
    sp_size: int  # ids >= sp_size are sentinels or the mask token
    mlm_fraction: float

    @property
    def mlm_capacity(self) -> int:
        return mlm_capacity(self.corruption.encoder_length, self.corruption.num_spans, self.mlm_fraction)

    def __call__(self, raw: np.ndarray, keys: np.ndarray, with_mlm: bool) -> dict[str, torch.Tensor]:
        inputs, targets = self.corruption(raw, keys)
        dec_input = np.full_like(targets, PAD_ID)
        dec_input[:, 1:] = targets[:, :-1]  # shift right; pad is also the decoder's start token
        batch = {
            "enc_tokens": torch.from_numpy(inputs),
            "enc_mask": torch.from_numpy(inputs != PAD_ID),
            "dec_input": torch.from_numpy(dec_input),
            "labels": torch.from_numpy(targets),
            "dec_loss_mask": torch.from_numpy((targets != PAD_ID).astype(np.float32)),
        }
        if with_mlm:
            positions, weights = mlm_positions(
                inputs, keys, self.mlm_fraction, special_mask(inputs, self.sp_size), self.mlm_capacity
            )
            batch["mlm_positions"] = torch.from_numpy(positions)
            batch["mlm_targets"] = torch.from_numpy(np.take_along_axis(inputs, positions, axis=1))
            batch["mlm_weights"] = torch.from_numpy(weights)
            batch["sample_keys"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64))
        return batch


class PretrainingSampler:
    """Micro-batches of sample indices for one data-parallel rank, from a consumed count.

    Like Megatron-LM's ``MegatronPretrainingSampler`` (which lives in megatron.training, not
    in megatron-core): consecutive runs of ``micro_batch_size * dp_size`` indices, rank r
    taking the r-th slice, so ranks see disjoint samples and a resumed run continues exactly.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} not in [0, {dp_size})")
        stride = micro_batch_size * dp_size
        if consumed_samples % stride:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of micro-batch x DP = {stride}")
        self.total_samples, self.consumed = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed) // (self.micro_batch_size * self.dp_size)

    def position(self, i: int) -> int:
        """Samples consumed (by all DP ranks) before this rank's ``i``-th micro-batch."""
        return self.consumed + i * self.micro_batch_size * self.dp_size

    def micro_batch(self, i: int) -> list[int]:
        """The sample indices of this rank's ``i``-th micro-batch from the consumed count."""
        first = self.position(i) + self.dp_rank * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return (self.micro_batch(i) for i in range(len(self)))


def parse_blend(entries: list) -> Optional[tuple[list[str], Optional[list[float]]]]:
    """``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (Megatron's --data-path syntax)."""
    if not entries:
        return None
    entries = [str(e) for e in entries]
    if len(entries) == 1:
        return [entries[0]], None
    if len(entries) % 2:
        raise DataError(f"data blend {entries}: expected weight/prefix pairs, got an odd count")
    try:
        weights = [float(w) for w in entries[0::2]]
    except ValueError:
        raise DataError(f"data blend {entries}: weights must be numbers ('0.7 prefixA 0.3 prefixB')") from None
    return entries[1::2], weights


def _check_on_every_rank(prefixes: list[str]) -> None:
    """Megatron's builder opens the datasets on rank 0 first while the others wait: opened (and
    checked) here on every rank, a missing or damaged file is every rank's error, not rank 0's alone."""
    for prefix in prefixes:
        open_indexed_dataset(prefix)


def build_datasets(
    train_blend: list,
    valid_blend: list,
    split: str,
    corruption: SpanCorruption,
    seed: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: Optional[str] = None,
) -> tuple[torch.utils.data.Dataset, Optional[torch.utils.data.Dataset]]:
    """Train and validation datasets through Megatron's blended dataset builder."""
    train = parse_blend(train_blend)
    if train is None:
        raise DataError("data.train_data is empty; give an indexed dataset prefix (see `spactor preprocess`)")
    valid = parse_blend(valid_blend)
    _check_on_every_rank(train[0] + (valid[0] if valid else []))
    common = dict(
        random_seed=seed,
        sequence_length=corruption.raw_length,
        path_to_cache=cache_dir,
        mid_level_dataset_surplus=0.005,
    )
    if valid is not None:
        config = SpactorDatasetConfig(blend_per_split=[train, valid, None], **common)
    else:
        config = SpactorDatasetConfig(blend=train, split=split, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = RangeSplitBuilder(
            SpactorDataset, [train_samples, valid_samples, 0], lambda: True, config
        ).build()
    return datasets[Split.train.value], datasets[Split.valid.value]


def build_eval_dataset(
    prefix: str, corruption: SpanCorruption, seed: int, samples: int, cache_dir: Optional[str] = None
) -> torch.utils.data.Dataset:
    """All of one indexed dataset as a validation split (an extra held-out set, ``data.eval_data``)."""
    _check_on_every_rank([prefix])
    config = SpactorDatasetConfig(
        blend_per_split=[None, ([prefix], None), None], random_seed=seed, sequence_length=corruption.raw_length,
        path_to_cache=cache_dir, mid_level_dataset_surplus=0.005,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = RangeSplitBuilder(SpactorDataset, [0, samples, 0], lambda: True, config).build()
    return datasets[Split.valid.value]
