"""Stable seeds from integer keys: one hash for Gumbel-max sampling and weight initialisation."""

from __future__ import annotations


def sampling_seed(*key: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-batch, ...); stable across runs and hosts."""
    h = 0x243F6A8885A308D3
    for k in key:
        h ^= (int(k) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
