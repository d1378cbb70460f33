#!/usr/bin/env python
"""Training-step benchmark: our Megatron-Core SpacTor vs Hugging Face T5, same shape and batch.

Prints, from one run on one machine:
(a) tokens/s of our SC-only (stage 2) optimizer step vs ``transformers.T5ForConditionalGeneration``
    of the same shape, batch and optimizer (torch AdamW), the named baseline;
(b) our stage-1 (hybrid) vs stage-2 step time, beside the FLOPs model's ratio of the two;
(a, b) each precision of ``--precisions`` (default fp32 and bf16: bf16 weights and activations, fp32
    master weights and optimizer state), the same model and batches, fp32 the baseline;
(c) the pipeline bubble: the idle fraction of each pipeline rank's step, measured, beside the
    1F1B formula ``(p - 1) / (v m + p - 1)`` (the named baseline; ``v`` = 1 non-interleaved, ``v``
    virtual stages per rank with Megatron's interleaved schedule), for PP = 2 and 4 at several
    micro-batch counts, in stage 1 (hybrid: G runs inside stage 0's forward and backward steps)
    and stage 2 (SC only), each phase with its own FLOPs-balanced layout (the hybrid one counts G
    on stage 0; a run re-plans at tau) and stage 1 also with stage 2's layout (no re-plan). One
    process per stage, one thread each: with fewer cores than stages the processes share cores
    and the measured bubble is not meaningful (the table says so).

Usage: python tools/bench_train.py [--parts a,b,c] [--d-model 256 --layers 4 --batch 8 --steps 6] [--clock cpu]
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
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.data.dataset import SpactorBatchBuilder  # noqa: E402
from spactor_mega.data.span_corruption import SpanCorruption, sample_keys  # noqa: E402
from spactor_mega.plan.flops import sample_flops  # noqa: E402
from benchlib import table  # noqa: E402
from spactor_mega.plan.layout import balanced_layout, bubble_fraction  # noqa: E402

SP_SIZE = 32000
VOCAB = 32128


def add_model_arguments(parser: argparse.ArgumentParser, encoder_length: int) -> None:
    """The model-shape flags :func:`make_config` reads (shared with tools/bench_scale.py)."""
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers = decoder layers")
    parser.add_argument("--encoder-length", type=int, default=encoder_length)


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


CLOCKS = {
    "wall": time.perf_counter,
    # This thread's CPU time, with torch on one thread (main() sets it): on a machine shared with other
    # jobs, wall time counts the time the scheduler gives to them; CPU time mostly does not.
    "cpu": time.thread_time,
}


def timed(fn, steps: int, clock=time.perf_counter) -> float:
    fn(0)  # warm-up: allocations, lazy init
    times = []
    for i in range(steps):
        start = clock()
        fn(i + 1)
        times.append(clock() - start)
    return statistics.median(times)


def build_ours(cfg: Config, steps: int, bf16: bool):
    """Our Megatron-Core engine (TP = PP = 1, parallel state initialised: the caller destroys it) and
    ``steps + 1`` hybrid and SC batches: ``(engine, hybrid_batches, sc_batches)``."""
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.training.engines import build_engine

    initialize_parallel(1, 1, seed=1)
    d, g, rtd = build_spactor_modules(cfg, VOCAB, with_generator=True,
                                      params_dtype=torch.bfloat16 if bf16 else torch.float32)
    objective = SpactorObjective.from_config(cfg, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)
    engine = build_engine(cfg, d, g, rtd, objective, bf16)
    hybrid_batches, _, _ = batches(cfg, steps + 1, True)
    sc_batches, _, _ = batches(cfg, steps + 1, False)
    return engine, hybrid_batches, sc_batches


def bench_ours(cfg: Config, steps: int, bf16: bool, clock=time.perf_counter) -> dict[str, float]:
    from spactor_mega.parallel.state import destroy_parallel

    engine, hybrid_batches, sc_batches = build_ours(cfg, steps, bf16)
    result = {
        "hybrid": timed(lambda i: engine.train_step([hybrid_batches[i]], Phase.HYBRID), steps, clock),
        "sc": timed(lambda i: engine.train_step([sc_batches[i]], Phase.SC_ONLY), steps, clock),
    }
    destroy_parallel()
    return result


def bench_hf(cfg: Config, steps: int, clock=time.perf_counter) -> float:
    from spactor_mega.model.hf_mapping import build_hf_model

    torch.manual_seed(1)
    model = build_hf_model(cfg.model, VOCAB).train()
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

    return timed(step, steps, clock)


class StepTimers:
    """The ``config.timers`` protocol of Megatron's schedules (``timers(name, log_level).start()/.stop()``)
    accumulating wall time per name. Hand-written because megatron.core's ``Timer`` calls
    ``torch.cuda.synchronize()`` unconditionally, which a CPU build of torch cannot do."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.first_start: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def __call__(self, name: str, log_level: int = 0):
        timers = self

        class _Timer:
            def start(self, barrier: bool = False):
                now = time.perf_counter()
                timers._started[name] = now
                timers.first_start.setdefault(name, now)

            def stop(self, barrier: bool = False):
                timers.total[name] = timers.total.get(name, 0.0) + time.perf_counter() - timers._started.pop(name)

        return _Timer()


def phase_layouts(cfg: Config, stages: int):
    """(hybrid, SC-only) FLOPs-balanced layouts: the hybrid one with G's and the RTD head's FLOPs on
    the first and last stage, as ``plan.layout.config_layout`` balances a run that re-plans at tau."""
    _, sc, builder = batches(cfg, 1, False)
    flops = sample_flops(cfg, sc.encoder_length, sc.decoder_length, VOCAB, builder.mlm_capacity)
    hybrid = balanced_layout(cfg, stages, sc.encoder_length, sc.decoder_length, vocab_size=VOCAB,
                             first_stage_extra_flops=flops.generator, last_stage_extra_flops=flops.rtd_head)
    return hybrid, balanced_layout(cfg, stages, sc.encoder_length, sc.decoder_length, vocab_size=VOCAB)


def _bubble_worker(rank: int, world: int, cfg: Config, microbatches: list[int], steps: int, vp: int = 1) -> dict:
    """One pipeline rank: for each micro-batch count, phase and layout, the median over ``steps`` of
    its idle fraction of the step region [step start, end of the forward-backward schedule]. Busy
    time is the schedule's forward+backward compute (G's forward and backward on stage 0 included).
    ``vp``: virtual stages per rank (Megatron's interleaved schedule)."""
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_stage_chunks
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine

    initialize_parallel(1, world, seed=1, vp=vp)
    hybrid_layout, sc_layout = phase_layouts(cfg, world * vp)
    objective = SpactorObjective.from_config(cfg, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)
    results = {"layouts": (hybrid_layout.describe(), sc_layout.describe())}
    runs = [("hybrid", hybrid_layout), ("sc", sc_layout)]
    if hybrid_layout != sc_layout:
        runs.insert(1, ("hybrid on SC layout", sc_layout))
    for key, layout in runs:
        hybrid = key.startswith("hybrid")
        d, g, rtd = build_stage_chunks(cfg, VOCAB, layout.stage_split(), with_generator=hybrid)
        engine = build_engine(cfg, d, g, rtd, objective, False)
        del d, g, rtd
        for m in microbatches:
            data, _, _ = batches(cfg, m, hybrid)
            fractions = []
            for i in range(steps + 1):
                timers = StepTimers()
                engine.d.config.timers = timers
                torch.distributed.barrier()
                start = time.perf_counter()
                engine.train_step(data, Phase.HYBRID if hybrid else Phase.SC_ONLY)
                engine.d.config.timers = None
                region = timers.first_start["forward-backward"] - start + timers.total["forward-backward"]
                busy = timers.total.get("forward-compute", 0.0) + timers.total.get("backward-compute", 0.0)
                if i:  # the first step is warm-up
                    fractions.append(1.0 - busy / region)
            results[(key, m)] = statistics.median(fractions)
        del engine
    destroy_parallel()
    return results


def bench_bubble(cfg: Config, stages: list[int], microbatches: list[int], steps: int,
                 virtual: tuple[int, ...] = (1,)) -> list[list]:
    from spactor_mega.parallel.testing import run_distributed

    rows = []
    for pp in stages:
        for vp in virtual:
            counts = [m for m in microbatches if vp == 1 or m % pp == 0]  # interleaving: multiples of PP
            if not counts or (vp > 1 and pp == 1):
                continue
            per_rank = run_distributed(_bubble_worker, pp, cfg, counts, steps, vp, timeout=3600)
            shared = " (cores shared)" if pp > (os.cpu_count() or 1) else ""
            name = f"{pp}{f' x V={vp}' if vp > 1 else ''}{shared}"
            hybrid_layout, sc_layout = per_rank[0]["layouts"]
            for stage_name, key, layout in (("1 (hybrid)", "hybrid", hybrid_layout),
                                            ("1 (hybrid)", "hybrid on SC layout", sc_layout),
                                            ("2 (SC only)", "sc", sc_layout)):
                for m in counts:
                    if (key, m) not in per_rank[0]:
                        continue
                    measured = [r[(key, m)] for r in per_rank]
                    rows.append([name, layout, stage_name, m, f"{bubble_fraction(pp, m, vp):.3f}",
                                 f"{statistics.mean(measured):.3f}", " ".join(f"{x:.2f}" for x in measured)])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, encoder_length=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--parts", default="a,b,c", help="which tables: a (vs HF), b (stage 1 vs 2), c (bubble)")
    parser.add_argument("--precisions", default="fp32,bf16", help="(a, b) our engine's precisions; fp32 is the baseline")
    parser.add_argument("--pipeline-stages", default="2,4", help="(c) PP sizes")
    parser.add_argument("--microbatches", default="1,2,4,8", help="(c) micro-batches per step")
    parser.add_argument("--virtual-stages", default="1,2", help="(c) virtual stages per rank (interleaved)")
    parser.add_argument("--pipeline-batch", type=int, default=2, help="(c) micro-batch size")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="(a, b) step time: wall, or cpu (this thread's CPU time, torch on one thread)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    clock = CLOCKS[args.clock]
    if args.clock == "cpu":
        torch.set_num_threads(1)

    cfg = make_config(args)
    _, sc, builder = batches(cfg, 1, False)
    tokens = args.batch * sc.encoder_length
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}; model d_model {args.d_model}, {args.layers}+{args.layers} "
          f"layers, vocab {VOCAB}; batch {args.batch} x {sc.encoder_length}/{sc.decoder_length}; AdamW; "
          f"ours in {args.precisions}; {args.clock} clock")

    precisions = args.precisions.split(",")
    if "a" in parts:
        hf = bench_hf(cfg, args.steps, clock)
    if parts & {"a", "b"}:
        ours = {p: bench_ours(cfg, args.steps, bf16=p == "bf16", clock=clock) for p in precisions}
    if "a" in parts:
        rows = [["transformers T5ForConditionalGeneration (baseline)", "fp32", f"{hf:.3f}", f"{tokens / hf:,.0f}", "1.00x"]]
        rows += [["spactor_mega, Megatron-Core engine, stage 2", p, f"{ours[p]['sc']:.3f}", f"{tokens / ours[p]['sc']:,.0f}",
                  f"{hf / ours[p]['sc']:.2f}x"] for p in precisions]
        table("(a) SC-only training step, encoder tokens/s (median step)",
              ["implementation", "precision", "s/step", "tokens/s", "vs HF"], rows)
    flops = sample_flops(cfg, sc.encoder_length, sc.decoder_length, VOCAB, builder.mlm_capacity)
    if "b" in parts:
        base = ours[precisions[0]]
        rows = []
        for p in precisions:
            rows += [["stage 2: SC only", p, f"{ours[p]['sc']:.3f}", "1.00", "1.00", f"{ours[p]['sc'] / base['sc']:.2f}"],
                     ["stage 1: SC + MLM(G) + RTD", p, f"{ours[p]['hybrid']:.3f}", f"{ours[p]['hybrid'] / ours[p]['sc']:.2f}",
                      f"{flops.hybrid / flops.sc_only:.2f}", f"{ours[p]['hybrid'] / base['hybrid']:.2f}"]]
        table(f"(b) stage 1 (hybrid) vs stage 2 (SC only); last column: s/step vs {precisions[0]} (baseline)",
              ["stage", "precision", "s/step", "measured ratio", "FLOPs-model ratio", f"vs {precisions[0]}"], rows)
    if "c" in parts:
        pipe_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=args.pipeline_batch))
        rows = bench_bubble(pipe_cfg, [int(x) for x in args.pipeline_stages.split(",")],
                            [int(x) for x in args.microbatches.split(",")], args.steps,
                            tuple(int(x) for x in args.virtual_stages.split(",")))
        table(f"(c) pipeline bubble, idle fraction of the step per rank (micro-batch {args.pipeline_batch}; "
              "FLOPs-balanced layouts, the hybrid one with G on stage 0)",
              ["PP", "layout", "stage", "micro-batches", "1F1B formula (baseline)", "measured, mean",
               "measured per rank"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
