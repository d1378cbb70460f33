"""Greedy decoding with D (TP-aware), the reference that HF ``generate()`` of an export must equal.

Encode once, then re-run the decoder on the whole prefix for every new token (no KV cache: D is
a training model and this decodes a few dozen tokens for checks and demos). Output as HF's
greedy ``generate()``: the start token (pad, 0) first, finished rows padded with 0.
"""

from __future__ import annotations

from typing import Optional

import torch

from spactor_mega.data.special_tokens import EOS_ID, PAD_ID

from .losses import vocab_parallel_argmax, vocab_range
from .t5 import T5Discriminator


@torch.no_grad()
def greedy_decode(
    d: T5Discriminator,
    enc_tokens: torch.Tensor,
    enc_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 20,
    *,
    start_id: int = PAD_ID,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """``[b, 1 + n]`` token ids, ``n <= max_new_tokens``; stops when every row has emitted EOS.
    ``vocab_limit``: ids at or above it are never chosen (rows padded beyond an exported vocabulary).
    Call with D in eval mode; collective over the TP group."""
    encoder_hidden = d.encode(enc_tokens, enc_mask)
    out = torch.full((enc_tokens.size(0), 1), start_id, dtype=torch.long, device=enc_tokens.device)
    done = torch.zeros(enc_tokens.size(0), dtype=torch.bool, device=enc_tokens.device)
    for _ in range(max_new_tokens):
        # the head on every position: under sequence parallelism its input is a sequence shard
        logits = d.lm_logits(d.decode(out, encoder_hidden, enc_mask))[out.size(1) - 1]  # [b, V/tp]
        if vocab_limit is not None:
            start, _ = vocab_range(logits.size(-1))
            ids = torch.arange(start, start + logits.size(-1), device=logits.device)
            logits = logits.masked_fill(ids >= vocab_limit, float("-inf"))
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), vocab_parallel_argmax(logits))
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == eos_id
        if bool(done.all()):
            break
    return out
