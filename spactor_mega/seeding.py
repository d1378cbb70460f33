"""Stable seeds and keys, one mixing function for all of them (data and model).

:func:`splitmix64` (vectorised, numpy) keys the data pipeline's per-sample randomness;
:func:`seed_from` chains it over integers for the generators the model seeds (weight
initialisation, G's Gumbel noise). Both are pure functions: the same on every host and run.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seed_from(*key: int) -> int:
    """A 63-bit seed (``torch.Generator.manual_seed`` takes it) from integers, e.g. (run seed,
    sample key) or (run seed, part, layer, name hash); negative integers are taken mod 2**64."""
    h = np.zeros(1, dtype=np.uint64)
    for k in key:
        h = splitmix64(h ^ np.uint64(int(k) & _MASK64))
    return int(h[0]) & 0x7FFFFFFFFFFFFFFF
