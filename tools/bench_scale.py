#!/usr/bin/env python
"""The scale model's ratios (``spactor_mega/plan/scale.py``, ``spactor train --dry-run``) against
what CPU runs measure, in one run. Absolute times on a GPU cluster cannot be checked here; the
ratios the model derives them from can:

(a) recompute's extra compute: the step time under ``model.recompute`` selective and full over
    none (our Megatron engine, one process), beside the model's ratio of the compute;
(b) the pipeline bubble at PP = 2 and 4: each rank's idle fraction of the step, measured through
    the timers of Megatron's schedule (``tools/bench_train.py``'s measurement, imported), beside the
    model's (stage FLOPs through the 1F1B schedule) and the equal-stage formula;
(c) communication of one step: the payload bytes the real engine hands to gloo's collectives
    (counted by wrapping them, ``spactor_mega/parallel/comm_count.py``), per group and collective,
    at TP = 2 x DP = 2, plain DP and the distributed optimizer, beside the model's
    (``tests/plan/test_scale.py`` asserts the same at DP = 2);
(d) activation memory: the dry run's estimate (``plan/memory.py``) against the bytes autograd keeps
    for D's stacks (``saved_tensors_hooks``), in bytes, per precision and recompute mode, at the
    shapes ``tests/plan/test_activation_memory.py`` holds to the byte and at this bench's model
    (``--device cuda`` on a GPU: D there, the GPU estimate), also for T5 v1.0's ReLU feed-forward
    and UMT5's bias table per layer.

Usage: python tools/bench_scale.py [--parts a,b,c,d] [--d-model 256 --layers 4 --encoder-length 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench_train import SP_SIZE, VOCAB, _bubble_worker, add_model_arguments, batches, make_config  # noqa: E402
from benchlib import table  # noqa: E402

from spactor_mega.curriculum import Phase  # noqa: E402

from spactor_mega.parallel.testing import run_distributed  # noqa: E402
from spactor_mega.plan.layout import bubble_fraction  # noqa: E402
from spactor_mega.plan.memory import RECOMPUTE  # noqa: E402
from spactor_mega.plan.scale import Hardware, predict  # noqa: E402
from tests.plan.test_activation_memory import KINDS, SHAPES, Shape, activation_rows  # noqa: E402
from tests.plan.test_scale import (  # noqa: E402
    count_step_collectives,
    padding_bound,
    predicted_bytes,
    tiny_config,
)

# Ratios only: a unit peak, and links that cost nothing (the ranks share one machine's memory).
CPU = Hardware("CPU", peak_tflops=1.0, efficiency=1.0, nvlink_gbs=float("inf"), network_gbs=float("inf"))
PHASES = (("hybrid", "1 (hybrid)"), ("sc_only", "2 (SC only)"))


def with_fields(cfg, section: str, **fields):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})


def recompute_times(cfg, steps: int) -> dict[tuple[str, str], float]:
    """Median CPU seconds of a step per (model.recompute, phase): one engine per setting in one
    process on one thread, their steps interleaved round by round. CPU time of a one-thread process
    is the work it did, whatever else the machine runs (wall time on a shared machine is not)."""
    import torch

    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=1)
    engines = {}
    for mode in RECOMPUTE:
        c = with_fields(cfg, "model", recompute=mode)
        objective = SpactorObjective.from_config(c, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)
        engines[mode] = build_engine(c, *build_spactor_modules(c, VOCAB, with_generator=True), objective, False)
    data = {"hybrid": (batches(cfg, 1, True)[0], Phase.HYBRID), "sc_only": (batches(cfg, 1, False)[0], Phase.SC_ONLY)}
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(steps + 1):  # the first round is warm-up
        for mode, engine in engines.items():
            for phase, (micro_batches, p) in data.items():
                start = time.process_time()
                engine.train_step(micro_batches, p)
                if i:
                    times.setdefault((mode, phase), []).append(time.process_time() - start)
    destroy_parallel()
    return {key: statistics.median(v) for key, v in times.items()}


def activation_memory_rows(cfg, device: str) -> list[list]:
    """The dry run's activation estimate (``plan/memory.py``) beside the bytes autograd keeps for
    D's stacks, at the shapes and model kinds tests/plan/test_activation_memory.py holds and at this
    bench's model."""
    decoder_length = batches(cfg, 1, False)[1].decoder_length
    m = cfg.model
    bench = Shape("bench", d_model=m.d_model, heads=m.num_heads, d_kv=m.d_kv, d_ff=m.d_ff,
                  encoder_layers=m.num_encoder_layers, decoder_layers=m.num_decoder_layers,
                  micro_batch=cfg.train.micro_batch_size, encoder_length=cfg.data.encoder_seq_length,
                  decoder_length=decoder_length, dropout=m.dropout)
    rows = []
    for shape, precision, recompute, estimate, measured in activation_rows((*SHAPES, *KINDS, bench), device):
        described = (f"{shape.name}: d_model {shape.d_model}, {shape.heads}x{shape.d_kv} heads, d_ff {shape.d_ff}, "
                     f"{shape.encoder_layers}+{shape.decoder_layers} layers, {shape.micro_batch} x "
                     f"{shape.encoder_length}/{shape.decoder_length}, dropout {shape.dropout}")
        rows.append([described, precision, recompute, f"{estimate:,.0f}", f"{measured:,}", f"{estimate / measured:.4f}"])
    return rows


def recompute_rows(cfg, steps: int) -> list[list]:
    measured = recompute_times(cfg, steps)
    model = {r: predict(with_fields(cfg, "model", recompute=r), 1, CPU, VOCAB).times for r in RECOMPUTE}
    rows = []
    for phase, name in PHASES:
        for r in RECOMPUTE:
            rows.append([name, r, f"{measured[(r, phase)]:.3f}", f"{measured[(r, phase)] / measured[('none', phase)]:.3f}",
                         f"{model[r][phase].compute_s / model['none'][phase].compute_s:.3f}"])
    return rows


def bubble_rows(cfg, stages: list[int], microbatches: list[int], steps: int) -> list[list]:
    """bench_train's worker measures each phase on its own balanced layout (and the hybrid phase on
    the SC-only one too); the scale model is given the same layouts: an AdamW run with tau inside it
    re-plans the hybrid phase, an Adafactor run keeps the SC-only layout (the optimizer changes no FLOPs)."""
    rows = []
    for pp in stages:
        per_rank = run_distributed(_bubble_worker, pp, cfg, microbatches, steps, 1, timeout=3600)
        hybrid_layout, sc_layout = per_rank[0]["layouts"]
        shared = " (cores shared)" if pp > (os.cpu_count() or 1) else ""
        runs = [("hybrid", "1 (hybrid)", hybrid_layout, "adamw"),
                ("hybrid on SC layout", "1 (hybrid), stage 2's layout", sc_layout, "adafactor"),
                ("sc", "2 (SC only)", sc_layout, "adamw")]
        for key, name, layout, optimizer in runs:
            for m in microbatches:
                if (key, m) not in per_rank[0]:
                    continue
                measured = [r[(key, m)] for r in per_rank]
                c = with_fields(with_fields(with_fields(with_fields(cfg, "parallel", pipeline_model_parallel_size=pp), "train",
                                                        global_batch_size=m * cfg.train.micro_batch_size),
                                            "spactor", tau=1.0), "optim", optimizer=optimizer)
                prediction = predict(c, pp, CPU, VOCAB)
                phase = "sc_only" if key == "sc" else "hybrid"
                assert prediction.layouts[phase].stages.describe() == layout, (prediction.layouts[phase], layout)
                idle = prediction.times[phase].rank_idle
                rows.append([f"{pp} {layout}{shared}", name, m, f"{bubble_fraction(pp, m):.3f}",
                             f"{statistics.mean(idle):.3f}", f"{statistics.mean(measured):.3f}",
                             " ".join(f"{x:.2f}" for x in idle), " ".join(f"{x:.2f}" for x in measured)])
    return rows


def traffic_rows(tp: int, dp: int) -> list[list]:
    counted = run_distributed(count_step_collectives, tp * dp, tp, (False, True), timeout=1200)[0]
    rows = []
    for (distributed_optimizer, phase), groups in counted.items():
        predicted = predicted_bytes(tp, dp, distributed_optimizer, phase)
        setup = f"TP {tp} x DP {dp}, {'distributed optimizer' if distributed_optimizer else 'DDP all-reduce'}"
        for group in ("TP", "DP", "TP x DP") if tp > 1 else ("DP",):
            got, want = groups[group], predicted[group]
            if group == "TP":  # the model prices G's row gathers as all-reduces: compare the sums
                got, want = {"all": sum(got.values())}, {"all": sum(want.values())}
            for kind in sorted(set(got) | set(want)):
                rows.append([setup, dict(PHASES)[phase], group, kind, f"{got.get(kind, 0):,}",
                             f"{want.get(kind, 0):,.0f}", f"{got.get(kind, 0) / want[kind]:.4f}" if want.get(kind) else "-"])
    pad = padding_bound(tiny_config(tp, dp, True), dp)
    print(f"TP {tp} x DP {dp}: Megatron pads the distributed optimizer's buffer by at most {pad:,} bytes; the model does not")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, encoder_length=128)
    parser.add_argument("--batch", type=int, default=8, help="(a) micro-batch = batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(d) where D runs and which kernels the estimate assumes")
    parser.add_argument("--pipeline-stages", default="2,4", help="(b) PP sizes")
    parser.add_argument("--microbatches", default="1,4,8", help="(b) micro-batches per step")
    parser.add_argument("--pipeline-batch", type=int, default=2, help="(b) micro-batch size")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    cfg = make_config(args)
    print(f"machine: {os.cpu_count()} cores; model d_model {args.d_model}, {args.layers}+{args.layers} layers, "
          f"vocab {VOCAB}, encoder length {args.encoder_length}, fp32, AdamW")
    if "a" in parts:
        table(f"(a) recompute: CPU time of a step over recompute none, batch {args.batch}, one process, one thread "
              f"(median of {args.steps})",
              ["stage", "model.recompute", "CPU s/step", "measured ratio", "scale model ratio (compute)"],
              recompute_rows(cfg, args.steps))
    if "b" in parts:
        pipe = with_fields(cfg, "train", micro_batch_size=args.pipeline_batch)
        table(f"(b) pipeline bubble: idle fraction of the step, micro-batch {args.pipeline_batch}, one process per "
              "stage (mean over ranks, then per rank)",
              ["PP, layout", "stage", "micro-batches", "1F1B formula", "scale model", "measured", "scale model per rank",
               "measured per rank"],
              bubble_rows(pipe, [int(x) for x in args.pipeline_stages.split(",")],
                          [int(x) for x in args.microbatches.split(",")], args.steps))
    if "d" in parts:
        table(f"(d) activation memory: the dry run's estimate (plan/memory.py, device {args.device}) against the bytes autograd "
              "keeps for D's encoder and decoder stacks (saved_tensors_hooks, distinct storages, parameters excluded; "
              "LM head and logits in neither), one micro-batch, training mode",
              ["shape (micro-batch x encoder/decoder length)", "precision", "model.recompute", "estimate bytes",
               "measured bytes", "estimate / measured"],
              activation_memory_rows(cfg, args.device))
    if "c" in parts:
        rows = traffic_rows(1, 2) + traffic_rows(2, 2)
        table("(c) payload bytes handed to gloo collectives in one train step (per rank, rank 0) vs the scale model "
              "(tiny model: d_model 32, 2+2 layers, vocab 256, batch 2 x 32/8 per DP rank, fp32)",
              ["setup", "stage", "group", "collective", "counted", "scale model", "counted / model"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
