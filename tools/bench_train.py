#!/usr/bin/env python
"""Training-step benchmark: our Megatron-Core SpacTor vs Hugging Face T5, same shape and batch.

Prints, from one run on one machine:
(a) tokens/s of our SC-only (stage 2) optimizer step vs ``transformers.T5ForConditionalGeneration``
    of the same shape, batch and optimizer (torch AdamW), the named baseline;
(b) our stage-1 (hybrid) vs stage-2 step time, beside the FLOPs model's ratio of the two.

Usage: python tools/bench_train.py [--d-model 256 --layers 4 --batch 8 --steps 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spactor_mega.config import Config  # noqa: E402
from spactor_mega.data.dataset import SpactorBatchBuilder  # noqa: E402
from spactor_mega.data.span_corruption import SpanCorruption, sample_keys  # noqa: E402
from spactor_mega.training.schedule import sample_flops  # noqa: E402
from benchlib import table  # noqa: E402

SP_SIZE = 32000
VOCAB = 32128


def make_config(args) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(
        cfg.model, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=args.d_ff,
        num_heads=args.heads, num_encoder_layers=args.layers, num_decoder_layers=args.layers,
    )
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-4, warmup_steps=0, lr_schedule="constant", clip_grad=1.0)
    cfg.train = dataclasses.replace(cfg.train, steps=1000, global_batch_size=args.batch, micro_batch_size=args.batch)
    cfg.spactor.tau = float("inf")
    cfg.data.encoder_seq_length = args.encoder_length
    return cfg


def batches(cfg: Config, n: int, with_mlm: bool) -> list[dict]:
    sc = SpanCorruption(cfg.data.encoder_seq_length, SP_SIZE + 99)
    builder = SpactorBatchBuilder(sc, SP_SIZE, cfg.spactor.mlm_fraction)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        raw = rng.integers(3, SP_SIZE, size=(cfg.train.micro_batch_size, sc.raw_length))
        out.append(builder(raw, sample_keys(0, np.arange(i * len(raw), (i + 1) * len(raw))), with_mlm))
    return out, sc, builder


def timed(fn, steps: int) -> float:
    fn(0)  # warm-up: allocations, lazy init
    times = []
    for i in range(steps):
        start = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ours(cfg: Config, steps: int) -> dict[str, float]:
    from spactor_mega.model.spactor import HYBRID, SC_ONLY, SpactorObjective, build_spactor_modules
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines.megatron import MegatronEngine

    initialize_parallel(1, 1, seed=1)
    d, g, rtd = build_spactor_modules(cfg, VOCAB, with_generator=True)
    objective = SpactorObjective.from_config(cfg, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)

    def loss_fn(batch, d, g, rtd, hybrid, step, micro_batch):
        return objective(batch, d, g, rtd, stage=HYBRID if hybrid else SC_ONLY, step=step, micro_batch=micro_batch)

    engine = MegatronEngine(cfg, d, g, rtd, loss_fn, bf16=False)
    hybrid_batches, _, _ = batches(cfg, steps + 1, True)
    sc_batches, _, _ = batches(cfg, steps + 1, False)
    result = {
        "hybrid": timed(lambda i: engine.train_step([hybrid_batches[i]], hybrid=True, step=i), steps),
        "sc": timed(lambda i: engine.train_step([sc_batches[i]], hybrid=False, step=i), steps),
    }
    destroy_parallel()
    return result


def bench_hf(cfg: Config, steps: int) -> float:
    from transformers import T5ForConditionalGeneration

    from spactor_mega.model.hf_mapping import hf_t5_config

    torch.manual_seed(1)
    model = T5ForConditionalGeneration(hf_t5_config(cfg.model, VOCAB)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    data, _, _ = batches(cfg, steps + 1, False)

    def step(i: int) -> None:
        b = data[i]
        labels = b["labels"].masked_fill(b["dec_loss_mask"] == 0, -100)
        out = model(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(),
                    decoder_input_ids=b["dec_input"], labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return timed(step, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers = decoder layers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    args = parser.parse_args()

    cfg = make_config(args)
    _, sc, builder = batches(cfg, 1, False)
    tokens = args.batch * sc.encoder_length
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}; model d_model {args.d_model}, {args.layers}+{args.layers} "
          f"layers, vocab {VOCAB}; batch {args.batch} x {sc.encoder_length}/{sc.decoder_length}; fp32, AdamW")

    hf = bench_hf(cfg, args.steps)
    ours = bench_ours(cfg, args.steps)
    table("(a) SC-only training step, encoder tokens/s (median step)", ["implementation", "s/step", "tokens/s", "vs HF"], [
        ["transformers T5ForConditionalGeneration (baseline)", f"{hf:.3f}", f"{tokens / hf:,.0f}", "1.00x"],
        ["spactor_mega, Megatron-Core engine, stage 2", f"{ours['sc']:.3f}", f"{tokens / ours['sc']:,.0f}",
         f"{hf / ours['sc']:.2f}x"],
    ])
    flops = sample_flops(cfg, sc.encoder_length, sc.decoder_length, VOCAB, builder.mlm_capacity)
    table("(b) stage 1 (hybrid) vs stage 2 (SC only)", ["stage", "s/step", "measured ratio", "FLOPs-model ratio"], [
        ["stage 2: SC only", f"{ours['sc']:.3f}", "1.00", "1.00"],
        ["stage 1: SC + MLM(G) + RTD", f"{ours['hybrid']:.3f}", f"{ours['hybrid'] / ours['sc']:.2f}",
         f"{flops.hybrid / flops.sc_only:.2f}"],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
