"""What the model must know of a micro-batch as Python values, taken from its CPU tensors before
the training loop moves them to the GPU.

Reading a GPU tensor on the host (``.tolist()``, ``bool(t)``) waits for the GPU's whole queue: per
micro-batch that stalls the step once per read. Two facts are needed on the host: each sample's
key (the seed of G's Gumbel noise for its row) and whether any encoder position is padding (the
attention then needs its mask; without padding it runs unmasked, cheaper). :func:`with_host_side`
records them while the batch is still on the CPU (``training.loop.on_device``); the accessors read
them from there, or, for a batch that came without them (tests, conversion, tools), from the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

HOST_SIDE = "host_side"  # the batch key of its HostSide


@dataclass(frozen=True)
class HostSide:
    sample_keys: Optional[tuple[int, ...]]  # None: the batch has no MLM fields (SC-only)
    encoder_padding: bool  # some position of ``enc_mask`` is padding


def with_host_side(batch: dict) -> dict:
    """``batch`` with its :class:`HostSide` (read from its CPU tensors: no device sync)."""
    keys = batch.get("sample_keys")
    side = HostSide(sample_keys=None if keys is None else tuple(keys.tolist()),
                    encoder_padding=_has_padding(batch["enc_mask"]))
    return {**batch, HOST_SIDE: side}


def sample_keys(batch: dict) -> list[int]:
    """Each sample's key, from the host side when the batch carries it."""
    side = batch.get(HOST_SIDE)
    return list(side.sample_keys) if side is not None else batch["sample_keys"].tolist()


def encoder_padding(batch: dict) -> bool:
    """Whether some encoder position of ``batch`` is padding, from the host side when it carries it."""
    side = batch.get(HOST_SIDE)
    return side.encoder_padding if side is not None else _has_padding(batch["enc_mask"])


def _has_padding(mask: torch.Tensor) -> bool:
    return not bool(mask.bool().all())
