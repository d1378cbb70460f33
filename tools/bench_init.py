#!/usr/bin/env python
"""Initialisation benchmark: the first encoder layer's self-attention logit std under each
``model.init`` scheme at T5 v1.1 widths, beside its analytic value.

For each shape, our D is built with one encoder layer (no decoder, no LM head, vocab 1024,
a small d_ff: nothing else affects these logits) under ``megatron`` and ``t5``; random tokens go
through the embedding and the input RMSNorm (unit RMS) and the logits are q.k (times the softmax
scale, 1.0 for T5) before the position bias (:func:`spactor_mega.model.init.attention_logit_std`).
Analytic: with unit-RMS inputs, q and k entries have variance std_q^2 d and std_k^2 d, so the
logits have std std_q std_k d sqrt(d_kv): 0.02^2 d sqrt(d_kv) under ``megatron``, 1 under ``t5``
(q (d d_kv)^-1/2, k d^-1/2).

Usage: python tools/bench_init.py [--tokens 512]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from benchlib import table  # noqa: E402

SHAPES = {  # name: (d_model, d_kv, heads), T5 v1.1
    "T5-small": (512, 64, 6),
    "T5-base": (768, 64, 12),
    "T5-xl": (2048, 64, 32),
}
VOCAB = 1024


def analytic_std(scheme: str, d_model: int, d_kv: int, init_method_std: float) -> float:
    if scheme == "t5":
        return 1.0
    return init_method_std**2 * d_model * math.sqrt(d_kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="random tokens per shape (4 rows)")
    args = parser.parse_args()

    from spactor_mega.config import INIT_SCHEMES, ModelConfig
    from spactor_mega.model.init import attention_logit_std
    from spactor_mega.model.t5 import T5Discriminator
    from spactor_mega.parallel.state import single_process_parallel

    tokens = torch.randint(0, VOCAB, (4, args.tokens // 4), generator=torch.Generator().manual_seed(0))
    rows = []
    with single_process_parallel():
        for name, (d_model, d_kv, heads) in SHAPES.items():
            for scheme in INIT_SCHEMES:
                m = ModelConfig(d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=256, num_encoder_layers=1,
                                num_decoder_layers=1, init=scheme)
                d = T5Discriminator(m, VOCAB, post_process=False, decoder_layers=(0, 0))
                measured = attention_logit_std(d, tokens)
                rows.append([name, f"{d_model}/{d_kv}/{heads}", scheme, f"{measured:.3f}",
                             f"{analytic_std(scheme, d_model, d_kv, m.init_method_std):.3f}"])
    table("First encoder layer's self-attention logit std at init (q.k before the position bias; "
          f"{args.tokens} random tokens through the embedding and input RMSNorm)",
          ["shape", "d_model/d_kv/heads", "model.init", "logit std", "analytic"], rows)


if __name__ == "__main__":
    main()
