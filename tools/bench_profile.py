#!/usr/bin/env python
"""Where the hybrid step's time goes, fp32 vs bf16: torch.profiler over our training steps.

For each precision of ``--precisions`` (the first is the baseline), the model and batches of
``tools/bench_train.py`` (same flags), ``--steps`` profiled optimizer steps of stage 1 (hybrid) and
of stage 2 (SC only) after one warm-up step each. Prints, from one run on one machine:
(a) the ops with the most self CPU time in the hybrid step, per step: hybrid, hybrid minus SC (the
    part G, the sampling and the RTD head add) per precision, and bf16's time over fp32's;
(b) the step times (median of the profiled steps, profiler overhead included) and stage 1 / stage 2
    beside the FLOPs model's ratio.

Usage: python tools/bench_profile.py [--d-model 256 --layers 4 --batch 8 --steps 3 --top 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_train import VOCAB, add_model_arguments, batches, build_ours, make_config  # noqa: E402
from benchlib import table  # noqa: E402
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.plan.flops import sample_flops  # noqa: E402


def profile_phase(engine, data: list[dict], phase: Phase, steps: int) -> tuple[dict[str, float], float]:
    """(self CPU ms per step by op name, median step seconds) over ``steps`` profiled steps."""
    engine.train_step([data[0]], phase)  # warm-up
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            start = time.perf_counter()
            engine.train_step([data[i + 1]], phase)
            times.append(time.perf_counter() - start)
    per_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return per_op, statistics.median(times)


def main() -> int:
    from spactor_mega.parallel.state import destroy_parallel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, encoder_length=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per phase and precision")
    parser.add_argument("--precisions", default="fp32,bf16", help="the first is the baseline")
    parser.add_argument("--top", type=int, default=25, help="rows of table (a)")
    args = parser.parse_args()
    cfg = make_config(args)
    precisions = args.precisions.split(",")
    _, sc, builder = batches(cfg, 1, False)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); d_model {args.d_model}, "
          f"{args.layers}+{args.layers} layers, vocab {VOCAB}; batch {args.batch} x {sc.encoder_length}/"
          f"{sc.decoder_length}, {builder.mlm_capacity} MLM slots per row; {args.steps} profiled steps per phase")

    ops, step = {}, {}
    for p in precisions:
        engine, hybrid_batches, sc_batches = build_ours(cfg, args.steps, bf16=p == "bf16")
        ops[p, "hybrid"], step[p, "hybrid"] = profile_phase(engine, hybrid_batches, Phase.HYBRID, args.steps)
        ops[p, "sc"], step[p, "sc"] = profile_phase(engine, sc_batches, Phase.SC_ONLY, args.steps)
        del engine
        destroy_parallel()

    base, last = precisions[0], precisions[-1]
    names = sorted(set().union(*(ops[p, "hybrid"] for p in precisions)),
                   key=lambda n: -max(ops[p, "hybrid"].get(n, 0.0) for p in precisions))[:args.top]
    rows = []
    for n in names:
        hybrid = {p: ops[p, "hybrid"].get(n, 0.0) for p in precisions}
        extra = {p: hybrid[p] - ops[p, "sc"].get(n, 0.0) for p in precisions}
        ratio = f"{hybrid[last] / hybrid[base]:.2f}" if hybrid[base] else "-"
        rows.append([n, *(f"{hybrid[p]:.1f}" for p in precisions), *(f"{extra[p]:.1f}" for p in precisions), ratio])
    table(f"(a) self CPU ms per hybrid step, top {args.top} ops; 'extra' = hybrid minus SC; last column: "
          f"{last} / {base} (baseline) of the hybrid time",
          ["op", *(f"hybrid {p}" for p in precisions), *(f"extra {p}" for p in precisions), f"{last}/{base}"], rows)

    flops = sample_flops(cfg, sc.encoder_length, sc.decoder_length, VOCAB, builder.mlm_capacity)
    rows = [[p, f"{step[p, 'sc']:.3f}", f"{step[p, 'hybrid']:.3f}", f"{step[p, 'hybrid'] / step[p, 'sc']:.2f}",
             f"{flops.hybrid / flops.sc_only:.2f}", f"{step[p, 'hybrid'] / step[base, 'hybrid']:.2f}"] for p in precisions]
    table(f"(b) profiled step seconds (median); last column: stage 1 vs {base} (baseline)",
          ["precision", "stage 2 s", "stage 1 s", "stage 1 / stage 2", "FLOPs-model ratio", f"stage 1 vs {base}"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
