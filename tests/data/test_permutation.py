"""The epoch order's permutation: every position once, the same wherever computed, and as spread
as a shuffle (chi-square bounds at the 0.1% tail, met by numpy's permutation; a network of one
or two Feistel rounds fails them)."""

import numpy as np
import pytest

from spactor_mega.data.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 1000, 4097, 65_537, 300_007])
def test_every_position_maps_to_a_distinct_element(n):
    order = Permutation(n, [1, 2, 3])
    chunks = order[np.arange(n)]
    np.testing.assert_array_equal(np.sort(chunks), np.arange(n))
    head = range(min(n, 500))
    assert [order[i] for i in head] == chunks[: len(head)].tolist()  # one at a time == all at once


def test_a_pure_function_of_seed_and_size():
    positions = np.arange(5000)
    first = Permutation(5000, [7, 8, 9])[positions]
    np.testing.assert_array_equal(Permutation(5000, [7, 8, 9])[positions], first)
    assert not np.array_equal(Permutation(5000, [7, 8, 10])[positions], first)
    assert not np.array_equal(Permutation(5001, [7, 8, 9])[positions], first)
    with pytest.raises(IndexError):
        Permutation(5000, [7, 8, 9])[5000]
    with pytest.raises(IndexError):
        Permutation(5000, [7, 8, 9])[np.array([0, -1])]


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seed", [[1, 2, 3], [1234, 5, 0]])
def test_the_order_is_spread_like_a_shuffle(seed):
    n = 100_003
    chunks = Permutation(n, seed)[np.arange(n)]
    positions = np.empty(n, dtype=np.int64)
    positions[chunks] = np.arange(n)
    # The first tenth of an epoch draws evenly from the whole corpus (chi-square, 19 dof: 0.1% tail 43.8).
    assert chi_square(np.bincount(chunks[: n // 10] * 20 // n, minlength=20)) < 43.8
    # Neighbouring positions read unrelated chunks (10x10 cells of pairs, 99 dof: 0.1% tail 148.2) ...
    assert chi_square(np.bincount(chunks[:-1] * 10 // n * 10 + chunks[1:] * 10 // n, minlength=100)) < 148.2
    # ... and neighbouring chunks (the same document) far apart positions: mean gap n/3, as for random pairs.
    for sequence in (chunks, positions):
        assert abs(np.abs(np.diff(sequence)).mean() / (n / 3) - 1) < 0.03
