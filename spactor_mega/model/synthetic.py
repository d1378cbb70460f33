"""Synthetic SpacTor batches (tests, smoke runs, benchmarks): the data pipeline's format, random ids.

Conventions as delivered by the data pipeline: pad 0, EOS 1, ``<extra_id_k>`` = ``sp_size + 99 - k``,
``mask_id`` = ``sp_size + 100``; ``dec_input`` is ``labels`` shifted right with 0; MLM positions
are sorted, avoid sentinels and EOS, and padded slots are position 0 / target 0 / weight 0;
``sample_keys`` are ``seed * 1000 + row`` (distinct for distinct seeds and rows).
"""

from __future__ import annotations

import torch

from spactor_mega.config import Config
from spactor_mega.data.special_tokens import EOS_ID, PAD_ID, special_mask


def synthetic_batch(
    batch_size: int = 2,
    enc_len: int = 32,
    dec_len: int = 8,
    mlm_slots: int = 6,
    sp_size: int = 150,
    seed: int = 0,
    pad_rows: int = 0,
    with_mlm: bool = True,
) -> dict:
    """A batch dict; the last ``pad_rows`` rows get trailing encoder padding (others none)."""
    gen = torch.Generator().manual_seed(seed)
    b = batch_size
    enc = torch.randint(3, sp_size, (b, enc_len), generator=gen)
    enc_mask = torch.ones(b, enc_len, dtype=torch.bool)
    lengths = []
    for i in range(b):
        n = enc_len if i < b - pad_rows else max(enc_len // 2, mlm_slots + 3)
        lengths.append(n)
        enc[i, n:] = PAD_ID
        enc_mask[i, n:] = False
        enc[i, n - 1] = EOS_ID
        # two sentinels at random positions (never masked)
        for k, p in enumerate(torch.randperm(n - 1, generator=gen)[:2].tolist()):
            enc[i, p] = sp_size + 99 - k
    labels = torch.randint(3, sp_size, (b, dec_len), generator=gen)
    labels[:, 0] = sp_size + 99
    labels[:, -1] = EOS_ID
    dec_loss_mask = torch.ones(b, dec_len, dtype=torch.float32)
    if b > 1:
        labels[-1, dec_len - 2 :] = PAD_ID  # a shorter target in the last row
        labels[-1, dec_len - 3] = EOS_ID
        dec_loss_mask[-1, dec_len - 2 :] = 0
    dec_input = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    batch = dict(enc_tokens=enc, enc_mask=enc_mask, dec_input=dec_input, labels=labels, dec_loss_mask=dec_loss_mask)
    if not with_mlm:
        return batch
    positions = torch.zeros(b, mlm_slots, dtype=torch.long)
    weights = torch.zeros(b, mlm_slots, dtype=torch.float32)
    for i in range(b):
        ok = (~special_mask(enc[i], sp_size)).nonzero().flatten()
        n = mlm_slots if i % 2 == 0 else max(1, mlm_slots - 2)  # some rows with padded slots
        pick = ok[torch.randperm(len(ok), generator=gen)[:n]].sort().values
        positions[i, : len(pick)] = pick
        weights[i, : len(pick)] = 1.0
    batch["mlm_positions"] = positions
    batch["mlm_targets"] = torch.where(weights > 0, enc.gather(1, positions), torch.zeros_like(positions))
    batch["mlm_weights"] = weights
    batch["sample_keys"] = seed * 1000 + torch.arange(b, dtype=torch.long)
    return batch


def tiny_config(tau: float = 10.0, depth_fraction: float = 0.5, **model_overrides):
    """A :class:`spactor_mega.config.Config` with a tiny D (d_model 32, 2 heads of 8, d_ff 64,
    2+2 layers) for tests and smoke runs."""
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_kv, m.d_ff, m.num_heads = 32, 8, 64, 2
    m.num_encoder_layers, m.num_decoder_layers = 2, 2
    for k, v in model_overrides.items():
        setattr(m, k, v)
    cfg.spactor.tau = tau
    cfg.generator.depth_fraction = depth_fraction
    return cfg
