"""A seeded pseudo-random permutation of ``range(n)``, computed per position: nothing to build or store.

An epoch's chunk order used to be ``default_rng(seed).permutation(n)`` written to a file: for C4
en's 275M chunks 1.1 GB and ~30 s of random accesses (Fisher-Yates cannot be done in pieces), on
the rank that builds it, once per epoch. numpy and torch only offer such materialised
permutations; a keyed bijection of ``[0, n)`` instead gives any position's chunk in a few
microseconds with no array at all, so it is written here.

The bijection is a Feistel network on ``[0, a*b)`` with ``a*b >= n`` (``a, b ~ sqrt(n)``, so
``a*b - n < a``): a value is a pair ``(L, R)`` in mixed radix, and a round maps it to
``(R, (L + F(R, key)) mod m)`` with the radices swapping each round (Black and Rogaway's
construction for arbitrary domains, "Ciphers with arbitrary finite domains", CT-RSA 2002). Each
round is invertible whatever ``F`` is, so the network is a permutation of ``[0, a*b)``; a result
``>= n`` is put through it again until it lands in ``[0, n)`` ("cycle walking"), which restricts
it to a permutation of ``[0, n)`` (expected extra passes: ``(a*b - n)/n``, about ``1/sqrt(n)``).
``F`` is the splitmix64 finaliser of the half plus a 64-bit round key drawn from
``default_rng(seed)``: a pure function of (seed, n, position), the same on every rank and
process, whatever the data-parallel layout.
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 8  # Luby-Rackoff needs 4 with random round functions; 8 for margin (~1 us each)
MASK64 = (1 << 64) - 1


def _mix64(z):
    """splitmix64's finaliser (Steele et al. 2014) on a Python int or a uint64 array, mod 2**64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class Permutation:
    """``perm[i]`` for ``i`` in ``range(n)``: a permutation of ``range(n)`` seeded by ``rng_seed``
    (anything ``np.random.default_rng`` takes). Index it with an int (returns an int) or an
    integer array (returns int64)."""

    def __init__(self, n: int, rng_seed):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.a = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
        self.b = -(-n // self.a)
        self.keys = [int(k) for k in np.random.default_rng(rng_seed).integers(0, MASK64, ROUNDS, np.uint64, endpoint=True)]

    def __len__(self) -> int:
        return self.n

    def _rounds(self, x):
        """The Feistel network on ``[0, a*b)``, on a Python int or a uint64 array."""
        high, low = self.a, self.b  # x = L * low + R with L < high, R < low
        for key in self.keys:
            left, right = x // low, x % low
            x = right * high + (left + _mix64((right + key) & MASK64) % high) % high  # reduced first: no uint64 overflow
            high, low = low, high
        return x

    def __getitem__(self, position):
        if np.ndim(position) == 0:
            position = int(position)
            if not 0 <= position < self.n:
                raise IndexError(f"position {position} outside a permutation of {self.n}")
            x = self._rounds(position)
            while x >= self.n:
                x = self._rounds(x)
            return x
        positions = np.asarray(position)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside a permutation of {self.n}")
        x = self._rounds(positions.astype(np.uint64))
        while (outside := x >= self.n).any():
            x[outside] = self._rounds(x[outside])
        return x.astype(np.int64)
