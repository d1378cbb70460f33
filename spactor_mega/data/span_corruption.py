"""T5 span corruption and SpacTor's MLM masking, as pure vectorised numpy.

Semantics follow T5's ``random_spans_helper`` / ``random_spans_noise_mask`` /
``noise_span_to_unique_sentinel`` exactly: ``num_noise = round(L * density)`` clamped to
[1, L-1], ``num_spans = max(1, round(num_noise / mean_span))``, noise and non-noise lengths
are uniformly random compositions, the sequence starts with non-noise, each noise span
becomes one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ... counting down from the top of
the vocabulary), the targets mirror the inputs, and both end with EOS.

Written by hand because seqio's version is TensorFlow and the numpy collator that HF's
Flax example and nanoT5 use loops over rows in Python. Here a whole batch is corrupted with
array operations, and every random draw is a hash of (seed, sample key, stream, position),
so an example is a pure function of its key: no generator state to carry, resume or shard.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from spactor_mega.data.special_tokens import EOS_ID
from spactor_mega.seeding import splitmix64

# Independent random streams per sample.
_STREAM_NOISE, _STREAM_NONNOISE, _STREAM_MLM = 1, 2, 3


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mix (C. Wellons' lowbias32); numpy runs uint32 far faster than uint64."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def random_bits(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """``[len(keys), n]`` uint32, a pure function of (64-bit key, stream, column)."""
    row = splitmix64(np.asarray(keys, dtype=np.uint64).reshape(-1, 1) * np.uint64(4) + np.uint64(stream))
    lo = (row & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (row >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        x = lo + np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B9)
    return _lowbias32(_lowbias32(x) ^ hi)


def sample_keys(seed: int, indices: np.ndarray, salt: int = 0) -> np.ndarray:
    """Per-sample random keys from a run seed, a dataset salt and sample indices."""
    base = splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ np.uint64(salt & (2**64 - 1)))
    with np.errstate(over="ignore"):
        return splitmix64(base + np.asarray(indices, dtype=np.uint64))


# Lengths ----------------------------------------------------------------------------------
def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) of a raw chunk, as T5's random_spans_noise_mask."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def _inputs_targets_length(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_span)
    num_nonnoise = tokens_length - num_noise
    # Inputs: non-noise tokens, one sentinel per span, EOS. Targets: the mirror.
    return num_nonnoise + num_spans + 1, num_noise + num_spans + 1


@functools.lru_cache(maxsize=256)
def random_spans_helper(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw chunk length, targets length) whose corruption fills ``inputs_length`` exactly.

    T5's ``random_spans_helper``: the longest raw chunk whose inputs (with sentinels and EOS)
    fit in ``inputs_length``. 512 -> (568, 114). Memoised: a search over one length, and
    ``spactor plan`` asks it for every layout it prices.
    """
    tokens_length = inputs_length
    while _inputs_targets_length(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = _inputs_targets_length(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length, targets_length


# Span corruption --------------------------------------------------------------------------
def _random_composition(bits: np.ndarray, total: int, parts: int) -> np.ndarray:
    """Uniformly random compositions of ``total`` into ``parts`` positive parts, per row.

    Same law as T5's ``_random_segmentation``: the ``parts - 1`` cut points are a uniformly
    random subset of the ``total - 1`` gaps, here the gaps with the smallest random bits.
    """
    rows = bits.shape[0]
    if parts == 1:
        return np.full((rows, 1), total, dtype=np.int64)
    cuts = np.argpartition(bits[:, : total - 1], parts - 2, axis=1)[:, : parts - 1] + 1
    cuts.sort(axis=1)
    bounds = np.concatenate(
        [np.zeros((rows, 1), np.int64), cuts, np.full((rows, 1), total, np.int64)], axis=1
    )
    return np.diff(bounds, axis=1)


def random_segments(keys: np.ndarray, length: int, noise_density: float, mean_span: float) -> tuple[np.ndarray, np.ndarray]:
    """Segment number ``[B, length]`` of every raw token, and where segments start.

    Segments alternate non-noise (even numbers) and noise (odd), starting with non-noise, as
    T5's ``random_spans_noise_mask``; noise span k is segment ``2k + 1``.
    """
    num_noise, num_spans = noise_counts(length, noise_density, mean_span)
    num_nonnoise = length - num_noise
    noise_lengths = _random_composition(random_bits(keys, _STREAM_NOISE, max(num_noise - 1, 1)), num_noise, num_spans)
    nonnoise_lengths = _random_composition(
        random_bits(keys, _STREAM_NONNOISE, max(num_nonnoise - 1, 1)), num_nonnoise, num_spans
    )
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=2).reshape(len(keys), 2 * num_spans)
    starts = np.zeros((len(keys), length), dtype=np.int32)
    np.put_along_axis(starts, np.cumsum(interleaved, axis=1)[:, :-1], 1, axis=1)
    segment = np.cumsum(starts, axis=1, dtype=np.int32)
    starts[:, 0] = 1
    return segment, starts.astype(bool)


def random_spans_noise_mask(keys: np.ndarray, length: int, noise_density: float, mean_span: float) -> np.ndarray:
    """``[B, length]`` bool: which raw tokens are noise (T5's law, starts with non-noise)."""
    return (random_segments(keys, length, noise_density, mean_span)[0] & 1) == 1


def _keep(values: np.ndarray, keep: np.ndarray, width: int) -> np.ndarray:
    """Row-wise selection of ``width`` kept values, then EOS."""
    out = np.empty((len(values), width + 1), dtype=values.dtype)
    out[:, :width] = values[keep].reshape(len(values), width)
    out[:, width] = EOS_ID
    return out


@dataclass(frozen=True)
class SpanCorruption:
    """Corrupts raw chunks of a fixed length into (inputs, targets) of fixed lengths."""

    encoder_length: int
    first_sentinel_id: int
    num_sentinels: int = 100
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def __post_init__(self) -> None:
        _, spans = noise_counts(self.raw_length, self.noise_density, self.mean_noise_span_length)
        if spans > self.num_sentinels:
            raise ValueError(
                f"data.encoder_seq_length={self.encoder_length} needs {spans} sentinels per example but the "
                f"tokenizer has {self.num_sentinels}; shorten the sequence or raise spactor.mean_noise_span_length"
            )

    @property
    def raw_length(self) -> int:
        return random_spans_helper(self.encoder_length, self.noise_density, self.mean_noise_span_length)[0]

    @property
    def decoder_length(self) -> int:
        return random_spans_helper(self.encoder_length, self.noise_density, self.mean_noise_span_length)[1]

    @property
    def num_spans(self) -> int:
        return noise_counts(self.raw_length, self.noise_density, self.mean_noise_span_length)[1]

    def __call__(self, raw: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``raw [B, raw_length]`` -> (inputs ``[B, encoder_length]``, targets ``[B, decoder_length]``)."""
        raw = np.asarray(raw, dtype=np.int64)
        length = raw.shape[1]
        if length != self.raw_length:
            raise ValueError(f"raw chunks have length {length}, expected {self.raw_length}")
        num_noise, num_spans = noise_counts(length, self.noise_density, self.mean_noise_span_length)
        segment, starts = random_segments(keys, length, self.noise_density, self.mean_noise_span_length)
        noise = (segment & 1) == 1
        # Span k (non-noise or noise) is replaced by <extra_id_k> = first_sentinel_id - k.
        sentinel = self.first_sentinel_id - (segment >> 1)
        inputs = _keep(np.where(noise, sentinel, raw), ~noise | starts, length - num_noise + num_spans)
        targets = _keep(np.where(noise, raw, sentinel), noise | starts, num_noise + num_spans)
        return inputs, targets


# MLM on top of span corruption ------------------------------------------------------------
def mlm_capacity(encoder_length: int, num_spans: int, fraction: float) -> int:
    """Width of the MLM position arrays: the fraction of all maskable slots, rounded."""
    return int(round(fraction * (encoder_length - num_spans - 1)))


def mlm_positions(
    inputs: np.ndarray, keys: np.ndarray, fraction: float, special: np.ndarray, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Picks ``round(fraction * maskable)`` random maskable positions per row.

    ``special`` marks tokens that are never masked (sentinels, EOS, pad). Returns positions
    ``[B, capacity]`` (ascending, padded with 0) and weights ``[B, capacity]`` (1 real, 0 pad).
    """
    rows, length = inputs.shape
    maskable = ~special
    counts = np.rint(fraction * maskable.sum(axis=1)).astype(np.int64)
    counts = np.minimum(counts, capacity)
    if capacity == 0:
        return np.zeros((rows, 0), np.int64), np.zeros((rows, 0), np.float32)
    # 31 random bits for maskable tokens; the largest value for the rest, so they come last.
    scores = np.where(maskable, random_bits(keys, _STREAM_MLM, length) >> np.uint32(1), np.uint32(0xFFFFFFFF))
    chosen = np.argpartition(scores, capacity - 1, axis=1)[:, :capacity]
    chosen = np.take_along_axis(chosen, np.argsort(np.take_along_axis(scores, chosen, axis=1), axis=1), axis=1)
    real = np.arange(capacity) < counts[:, None]
    positions = np.sort(np.where(real, chosen, length), axis=1)
    return np.where(positions == length, 0, positions), real.astype(np.float32)
