#!/usr/bin/env python
"""Where the hybrid step's time goes, fp32 vs bf16: CPU time per aten op over our training steps.

For each precision of ``--precisions`` (the first is the baseline), the model and batches of
``tools/bench_train.py`` (same flags), ``--steps`` optimizer steps of stage 1 (hybrid) and of stage 2
(SC only) after one warm-up step each, torch on one thread. Each aten op (below autograd, so the
backward's ops too) is timed by this thread's CPU time (:class:`OpCpuTime`): torch.profiler reports
wall time, which on a machine shared with other jobs mostly measures the scheduler. Prints, from one
run on one machine:
(a) the ops with the most CPU time in the hybrid step, per step: hybrid, hybrid minus SC (the part G,
    the sampling and the RTD head add) per precision, and bf16's hybrid time over fp32's;
(b) the step CPU times (median) and stage 1 / stage 2 beside the FLOPs model's ratio;
(c) Gumbel-max sampling alone at the step's logits shape ``[batch, MLM slots, vocab]``, fp32 and bf16
    logits, TP = 1 and each rank of TP = 2 (``--sampler-tp``): today's sampler against the one before
    it (898cb1b: every rank draws noise for the whole vocabulary), the named baseline.

Usage: python tools/bench_profile.py [--d-model 256 --layers 4 --batch 8 --steps 3 --top 25 --parts a,c]
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench_train import VOCAB, add_model_arguments, batches, build_ours, make_config  # noqa: E402
from benchlib import table  # noqa: E402
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.model.generator import gumbel_max_sample  # noqa: E402
from spactor_mega.model.losses import vocab_parallel_argmax, vocab_range  # noqa: E402
from spactor_mega.plan.flops import sample_flops  # noqa: E402
from spactor_mega.seeding import seed_from  # noqa: E402


@torch.no_grad()
def full_vocab_gumbel_sample(logits, *, temperature, row_seeds, sample_vocab_size, forbidden_ids=()):
    """The baseline of table (c): ``gumbel_max_sample`` as of 898cb1b (kept here only to be timed):
    each row's noise drawn for the whole vocabulary on every TP rank and sliced to the shard."""
    from megatron.core import parallel_state

    local_vocab = logits.size(-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, end = vocab_range(local_vocab)
    per_row = logits[0].numel() // local_vocab
    gen = torch.Generator(device=logits.device)
    noise = []
    for seed in row_seeds:
        gen.manual_seed(int(seed))
        u = torch.rand(per_row, local_vocab * tp, generator=gen, device=logits.device, dtype=torch.float32)
        noise.append(u[:, start:end])
    gumbel = -torch.log(-torch.log(torch.stack(noise).view(logits.shape)))
    scores = logits.float() / temperature + gumbel
    ids = torch.arange(start, end, device=logits.device)
    bad = ids >= sample_vocab_size
    for f in forbidden_ids:
        bad |= ids == int(f)
    scores += torch.zeros(local_vocab, device=logits.device).masked_fill_(bad, float("-inf"))
    return vocab_parallel_argmax(scores, start)


def _sampler_times(rank: int, world: int, shape: tuple, repeats: int) -> dict:
    """Median seconds of each sampler on this rank's shard of ``shape``'s logits, fp32 and bf16."""
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel

    initialize_parallel(world, 1, seed=1)
    logits = torch.randn(*shape[:-1], shape[-1] // world, generator=torch.Generator().manual_seed(rank))
    seeds = [seed_from(1, k) for k in range(shape[0])]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        typed = logits.to(dtype)
        samplers = {"baseline": full_vocab_gumbel_sample, "blocks": gumbel_max_sample}
        times = {name: [] for name in samplers}
        for i in range(repeats + 1):  # the first is warm-up; the variants alternate (a shared machine's load drifts)
            for name, fn in samplers.items():
                start = time.thread_time()
                fn(typed, temperature=1.0, row_seeds=seeds, sample_vocab_size=32000, forbidden_ids=(0, 1))
                if i:
                    times[name].append(time.thread_time() - start)
        out.update({(dtype, name): statistics.median(t) for name, t in times.items()})
    destroy_parallel()
    return out


class OpCpuTime(TorchDispatchMode):
    """Accumulates this thread's CPU seconds per aten op (with torch on one thread, all of its work)."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.thread_time() - start
        return out


def profile_phase(engine, data: list[dict], phase: Phase, steps: int) -> tuple[dict[str, float], float]:
    """(CPU ms per step by aten op, median step CPU seconds) over ``steps`` steps after a warm-up."""
    engine.train_step([data[0]], phase)
    times = []
    ops = OpCpuTime()
    with ops:
        for i in range(steps):
            start = time.thread_time()
            engine.train_step([data[i + 1]], phase)
            times.append(time.thread_time() - start)
    return {n: t * 1e3 / steps for n, t in ops.seconds.items()}, statistics.median(times)


def sampler_table(batch: int, slots: int, tps: list[int], repeats: int) -> None:
    from spactor_mega.parallel.testing import run_distributed

    shape = (batch, slots, VOCAB)
    rows = []
    for tp in tps:
        per_rank = run_distributed(_sampler_times, tp, shape, repeats, timeout=3600)
        for dtype in (torch.float32, torch.bfloat16):
            base = max(r[dtype, "baseline"] for r in per_rank)  # a step waits for its slowest rank
            new = max(r[dtype, "blocks"] for r in per_rank)
            rows.append([tp, str(dtype).removeprefix("torch."), f"{base * 1e3:.0f}", f"{new * 1e3:.0f}", f"{new / base:.2f}"])
    table(f"(c) Gumbel-max sampling of [{batch}, {slots}, {VOCAB}] logits, CPU ms per call (median of {repeats}, slowest "
          "rank; one thread per rank); baseline: the full-vocabulary draw of 898cb1b",
          ["TP", "logits", "baseline ms", "blocks ms", "blocks / baseline"], rows)


def main() -> int:
    from spactor_mega.parallel.state import destroy_parallel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, encoder_length=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per phase and precision")
    parser.add_argument("--precisions", default="fp32,bf16", help="the first is the baseline")
    parser.add_argument("--top", type=int, default=25, help="rows of table (a)")
    parser.add_argument("--parts", default="a,c", help="a: profile of the steps (tables a, b), c: sampler alone")
    parser.add_argument("--sampler-tp", default="1,2", help="(c) TP sizes (one process per rank)")
    parser.add_argument("--sampler-repeats", type=int, default=5, help="(c) timed calls per variant (median)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    cfg = make_config(args)
    precisions = args.precisions.split(",")
    _, sc, builder = batches(cfg, 1, False)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); d_model {args.d_model}, "
          f"{args.layers}+{args.layers} layers, vocab {VOCAB}; batch {args.batch} x {sc.encoder_length}/"
          f"{sc.decoder_length}, {builder.mlm_capacity} MLM slots per row; {args.steps} timed steps per phase")

    if "c" in parts:
        sampler_table(args.batch, builder.mlm_capacity, [int(t) for t in args.sampler_tp.split(",")],
                      args.sampler_repeats)
    if "a" not in parts:
        return 0
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
    table(f"(a) CPU ms per hybrid step by aten op, top {args.top}; 'extra' = hybrid minus SC; last column: "
          f"{last} / {base} (baseline) of the hybrid time",
          ["op", *(f"hybrid {p}" for p in precisions), *(f"extra {p}" for p in precisions), f"{last}/{base}"], rows)

    flops = sample_flops(cfg, sc.encoder_length, sc.decoder_length, VOCAB, builder.mlm_capacity)
    rows = [[p, f"{step[p, 'sc']:.3f}", f"{step[p, 'hybrid']:.3f}", f"{step[p, 'hybrid'] / step[p, 'sc']:.2f}",
             f"{flops.hybrid / flops.sc_only:.2f}", f"{step[p, 'hybrid'] / step[base, 'hybrid']:.2f}"] for p in precisions]
    table(f"(b) step CPU seconds (median, ops timed); last column: stage 1 vs {base} (baseline)",
          ["precision", "stage 2 s", "stage 1 s", "stage 1 / stage 2", "FLOPs-model ratio", f"stage 1 vs {base}"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
