"""Span corruption is T5's, exactly; MLM masking respects the special tokens."""

import math

import numpy as np
import pytest

from spactor_mega.data.span_corruption import (
    SpanCorruption,
    mlm_capacity,
    mlm_positions,
    noise_counts,
    random_spans_helper,
    random_spans_noise_mask,
    sample_keys,
)

SP_SIZE = 32000
FIRST_SENTINEL = SP_SIZE + 99


def corrupt(n=2000, encoder_length=512, seed=0):
    sc = SpanCorruption(encoder_length, FIRST_SENTINEL)
    rng = np.random.default_rng(seed)
    raw = rng.integers(3, SP_SIZE, size=(n, sc.raw_length))
    keys = sample_keys(seed, np.arange(n))
    inputs, targets = sc(raw, keys)
    return sc, raw, keys, inputs, targets


def reconstruct(inputs_row, targets_row):
    """Replaces each sentinel in the inputs by the target span that follows it."""
    spans, current = {}, None
    for t in targets_row[:-1]:
        if t >= SP_SIZE:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs_row[:-1]:
        out.extend(spans[t] if t >= SP_SIZE else [t])
    return out


@pytest.mark.parametrize("inputs_length, expected", [(512, (568, 114)), (1024, (1137, 229)), (128, (141, 29))])
def test_random_spans_helper_lengths(inputs_length, expected):
    assert random_spans_helper(inputs_length) == expected


def test_noise_counts_follow_t5_rounding_and_clamping():
    assert noise_counts(568, 0.15, 3.0) == (85, 28)
    assert noise_counts(2, 0.15, 3.0) == (1, 1)  # clamped up to one noise token
    assert noise_counts(4, 0.99, 3.0) == (3, 1)  # clamped to length - 1


def test_shapes_eos_and_sentinel_order():
    sc, raw, _, inputs, targets = corrupt(200)
    assert inputs.shape == (200, 512) and targets.shape == (200, 114)
    assert (inputs[:, -1] == 1).all() and (targets[:, -1] == 1).all()
    assert (inputs[:, 0] < SP_SIZE).all(), "sequences start with non-noise"
    assert (targets[:, 0] == FIRST_SENTINEL).all()
    for row in list(inputs[:20]) + list(targets[:20]):
        sentinels = row[row >= SP_SIZE]
        np.testing.assert_array_equal(sentinels, FIRST_SENTINEL - np.arange(sc.num_spans))


def test_every_sample_reconstructs_the_raw_chunk():
    _, raw, _, inputs, targets = corrupt(500)
    for i in range(len(raw)):
        assert reconstruct(inputs[i], targets[i]) == list(raw[i])


def test_noise_fraction_and_mean_span_length_over_many_samples():
    n, length = 4000, 568
    noise = random_spans_noise_mask(sample_keys(3, np.arange(n)), length, 0.15, 3.0)
    assert abs(noise.mean() - 0.15) < 0.005
    starts = noise & ~np.pad(noise, ((0, 0), (1, 0)))[:, :-1]
    assert not noise[:, 0].any()
    assert abs(noise.sum() / starts.sum() - 3.0) / 3.0 < 0.02


def test_span_lengths_follow_the_uniform_composition_law():
    """P(a given noise span has length k) = C(n-k-1, s-2) / C(n-1, s-1) for n tokens in s spans."""
    n_samples, length = 4000, 568
    num_noise, num_spans = noise_counts(length, 0.15, 3.0)
    noise = random_spans_noise_mask(sample_keys(5, np.arange(n_samples)), length, 0.15, 3.0)
    # Length of every noise span: run lengths of the noise mask.
    padded = np.pad(noise.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    lengths = np.nonzero(edges == -1)[1] - np.nonzero(edges == 1)[1]
    assert len(lengths) == n_samples * num_spans
    for k in (1, 2, 3, 5, 8):
        expected = math.comb(num_noise - k - 1, num_spans - 2) / math.comb(num_noise - 1, num_spans - 1)
        observed = (lengths == k).mean()
        sigma = math.sqrt(expected * (1 - expected) / len(lengths))
        assert abs(observed - expected) < 5 * sigma + 1e-4, (k, observed, expected)


def test_too_many_spans_for_the_sentinels_is_rejected():
    with pytest.raises(ValueError, match="encoder_seq_length=2048 needs .* sentinels"):
        SpanCorruption(2048, FIRST_SENTINEL, num_sentinels=100)


def test_same_key_same_sample_other_key_other_sample():
    sc, raw, keys, inputs, _ = corrupt(50)
    again, _ = sc(raw, keys)
    np.testing.assert_array_equal(inputs, again)
    shifted, _ = sc(raw, sample_keys(0, np.arange(1, 51)))
    assert (shifted != inputs).any(axis=1).all()


def test_a_sample_does_not_depend_on_its_batch():
    sc, raw, keys, inputs, targets = corrupt(64)
    alone_inputs, alone_targets = sc(raw[17:18], keys[17:18])
    np.testing.assert_array_equal(alone_inputs[0], inputs[17])
    np.testing.assert_array_equal(alone_targets[0], targets[17])


@pytest.mark.parametrize("fraction", [0.15, 0.3])
def test_mlm_never_masks_special_tokens_and_hits_the_fraction(fraction):
    sc, raw, keys, inputs, _ = corrupt(1000)
    # Put document-boundary EOS tokens inside the chunks too.
    inputs = inputs.copy()
    inputs[:, 100] = 1
    inputs[:, 300] = 0
    special = (inputs <= 1) | (inputs >= SP_SIZE)
    capacity = mlm_capacity(512, sc.num_spans, fraction)
    positions, weights = mlm_positions(inputs, keys, fraction, special, capacity)
    real = weights > 0
    hit = np.take_along_axis(special, positions, axis=1)
    assert not hit[real].any()
    fraction_observed = real.sum() / (~special).sum()
    assert abs(fraction_observed - fraction) < 0.01
    assert (np.diff(np.where(real, positions, 10**6), axis=1) > 0).all(), "distinct and ascending, padding last"


def test_mlm_positions_are_uniform_over_maskable_tokens():
    sc, raw, keys, inputs, _ = corrupt(3000)
    special = (inputs <= 1) | (inputs >= SP_SIZE)
    positions, weights = mlm_positions(inputs, keys, 0.15, special, mlm_capacity(512, sc.num_spans, 0.15))
    hits = np.zeros(512)
    np.add.at(hits, positions[weights > 0], 1)
    maskable = (~special).sum(axis=0)
    rate = hits[maskable > 1000] / maskable[maskable > 1000]
    assert abs(rate.mean() - 0.15) < 0.005
    assert rate.std() < 0.03, "no position is favoured"
