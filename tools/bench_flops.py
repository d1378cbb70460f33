#!/usr/bin/env python
"""The FLOPs model (``spactor_mega/plan/flops.py``: MFU, ``--dry-run``, the pipeline layout) against
``torch.utils.flop_counter.FlopCounterMode``'s count of one real SpacTor training step (forward +
backward) of the CPU model, per sample, for each public T5 family at base size (12 + 12 layers,
d_model 768, 12 heads of 64; encoder 512 / decoder 114 tokens of a span-corrupted sample):

- t5-v1_0: d_ff 3072, relu feed-forward, tied head (d_model**-0.5 rescale), vocab 32128;
- t5-v1_1 (and Flan-T5): d_ff 2048, gated-gelu, untied head, vocab 32128;
- mt5: t5-v1_1's shape, vocab 250112;
- umt5: mt5's, a relative-position bias table per layer, vocab 256384;
- gated-silu (UL2-style): t5-v1_1's shape with gated-silu.

Both phases: SC only (D) and hybrid (D + G + RTD head; G of the presets' depth fraction 0.25, 3
layers). The named baseline is the counter. D, G and the RTD head are built by
``spactor_mega.model.stages.build_spactor_modules`` (one process, TP = PP = 1, fp32) and run by
``SpactorObjective`` on a batch of the data pipeline (``SpactorBatchBuilder``), for real on the CPU
(a few seconds a step at base size, 7.5 GB at most: no fake tensors needed).

What each side counts. The FLOPs model counts matmuls (forward, and backward as twice the
forward); the counter counts matmul-like aten ops (``mm``, ``addmm``, ``bmm``, SDPA kernels), so
the norms, softmax, activations, position-bias lookups, the d_model**-0.5 rescale, the losses and
G's sampling are on neither side. The counter's registry lacks torch's CPU flash-attention kernel,
which the cross-attention takes (no bias, no dropout): registered here with torch's formulas for
the CUDA flash kernels (tests/plan/test_flops.py), whose backward counts a recompute of the scores
``QK^T`` that the model, by the MFU convention, does not. That recompute is the whole difference:
the table shows it, and the counter's count without it, which equals the model exactly
(tests/plan/test_flops.py asserts the same at tiny sizes). Self-attention, with a position bias that
has a gradient, takes the math path (``bmm``), counted as the model counts it.

Usage: python tools/bench_flops.py [--families t5-v1_0,mt5] [--layers 12] [--encoder-length 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402

from benchlib import table  # noqa: E402
from spactor_mega.config import Config  # noqa: E402
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.data.dataset import SpactorBatchBuilder  # noqa: E402
from spactor_mega.data.span_corruption import SpanCorruption, sample_keys  # noqa: E402
from spactor_mega.plan.flops import format_flops, sample_flops  # noqa: E402
from tests.plan.test_flops import FAMILIES, count_step_flops  # noqa: E402

SP_SIZE = 32000  # sampled ids (the mask and sentinels above it)
BASE = dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048)
# each family's base size and vocabulary rows, beside its kind (tests/plan/test_flops.py)
SIZES = {
    "t5-v1_0": (dict(BASE, d_ff=3072), 32128),
    "t5-v1_1": (BASE, 32128),
    "mt5": (BASE, 250112),
    "umt5": (BASE, 256384),
    "gated-silu": (BASE, 32128),
}


def family_config(family: str, layers: int, encoder_length: int) -> Config:
    cfg = Config()
    sizes, _ = SIZES[family]
    cfg.model = dataclasses.replace(cfg.model, **sizes, **FAMILIES[family], num_encoder_layers=layers,
                                    num_decoder_layers=layers)
    cfg.generator.depth_fraction = 0.25
    cfg.spactor.tau = float("inf")
    cfg.data.encoder_seq_length = encoder_length
    return cfg


def measure(family: str, layers: int, encoder_length: int) -> list[list]:
    """The table's rows of one family: each phase, model beside counter."""
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import single_process_parallel

    cfg = family_config(family, layers, encoder_length)
    vocab = SIZES[family][1]
    corruption = SpanCorruption(encoder_length, SP_SIZE + 99)
    builder = SpactorBatchBuilder(corruption, SP_SIZE, cfg.spactor.mlm_fraction)
    raw = np.random.default_rng(0).integers(3, SP_SIZE, size=(1, corruption.raw_length))
    batch = builder(raw, sample_keys(0, np.arange(1)), True)
    se, sd, mlm = corruption.encoder_length, corruption.decoder_length, builder.mlm_capacity
    model = sample_flops(cfg, se, sd, vocab, mlm)
    rows = []
    with single_process_parallel(seed=1):
        modules = build_spactor_modules(cfg, vocab, with_generator=True)
        for phase, name, expected in ((Phase.SC_ONLY, "SC only", model.sc_only), (Phase.HYBRID, "hybrid", model.hybrid)):
            counted = count_step_flops(cfg, modules, batch, phase, SP_SIZE + 100, SP_SIZE)
            rows.append([family, name, f"{se}/{sd}/{mlm}", format_flops(expected), format_flops(counted.total),
                         f"{counted.total / expected:.4f}", format_flops(counted.recompute),
                         f"{counted.model_flops / expected:.6f}"])
        del modules
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
    parser.add_argument("--layers", type=int, default=12, help="encoder layers = decoder layers")
    parser.add_argument("--encoder-length", type=int, default=512)
    args = parser.parse_args()
    rows = [row for family in args.families.split(",") for row in measure(family, args.layers, args.encoder_length)]
    table(f"Training FLOPs of one sample, FLOPs model vs FlopCounterMode (baseline), {args.layers}+{args.layers} "
          "layers, fp32 CPU",
          ["family", "phase", "enc/dec/mlm", "model", "counted", "counted/model", "flash recompute",
           "(counted - recompute)/model"], rows)


if __name__ == "__main__":
    main()
