#!/usr/bin/env python
"""Memory and step time per engine setup: DeepSpeed ZeRO-0/1/2/3 with and without offload, and
the Megatron engine (the baseline), one model size, 2 data-parallel processes, from one run.

Each setup runs in a fresh pair of processes (peak RSS is per process): build D + G + RTD head,
the engine, then hybrid (stage-1) optimizer steps on synthetic batches. Reported per rank (the
max over ranks): peak memory (GPU when present, else CPU RSS), its increase over the process
before the engine was built (what the engine's model states and training add), our
``--dry-run`` estimate of the model states (GPU + CPU: on a CPU machine all of it is RSS), and
the median step time.

Usage: python tools/bench_memory.py [--d-model 256 --layers 4 --seq 128 --batch 4 --steps 5] [--only "distributed"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402
from spactor_mega.parallel.testing import run_distributed  # noqa: E402

SP_SIZE, VOCAB = 32000, 32128
SETUPS = [
    ("Megatron engine (baseline)", None),
    ("Megatron engine + distributed optimizer", dict(parallel=dict(distributed_optimizer=True))),
    ("DeepSpeed ZeRO-0", dict(zero_stage=0)),
    ("DeepSpeed ZeRO-1", dict(zero_stage=1)),
    ("DeepSpeed ZeRO-2", dict(zero_stage=2)),
    ("DeepSpeed ZeRO-3", dict(zero_stage=3)),
    ("DeepSpeed ZeRO-1 + optimizer offload", dict(zero_stage=1, offload_optimizer="cpu")),
    ("DeepSpeed ZeRO-2 + optimizer offload", dict(zero_stage=2, offload_optimizer="cpu")),
    ("DeepSpeed ZeRO-3 + optimizer offload", dict(zero_stage=3, offload_optimizer="cpu")),
    ("DeepSpeed ZeRO-3 + optimizer + param offload", dict(zero_stage=3, offload_optimizer="cpu", offload_param="cpu")),
]


def _config(args, zero):
    from spactor_mega.config import Config

    cfg = Config()
    m = cfg.model
    m.d_model, m.d_kv, m.d_ff, m.num_heads = args.d_model, 64, 4 * args.d_model, args.d_model // 64
    m.num_encoder_layers = m.num_decoder_layers = args.layers
    cfg.spactor.tau = float("inf")  # stage 1 throughout: D, G and the RTD head all hold state
    cfg.data.encoder_seq_length = args.seq
    cfg.train.micro_batch_size, cfg.train.global_batch_size = args.batch, 2 * args.batch
    cfg.train.steps, cfg.train.precision = args.steps, "fp32"
    cfg.optim.warmup_steps = 1
    if zero is not None and "parallel" in zero:
        for key, value in zero["parallel"].items():
            setattr(cfg.parallel, key, value)
    elif zero is not None:
        cfg.train.engine = "deepspeed"
        for key, value in zero.items():
            setattr(cfg.deepspeed, key, value)
    return cfg


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _optimizer_state_mb(engine) -> float:
    """This rank's optimizer state (moments, steps; the fp32 masters where they are copies), MiB."""
    from spactor_mega.training.engines.released import optimizer_state_tensors

    if hasattr(engine, "d_optimizer"):  # Megatron: the torch optimizers inside Megatron's wrappers
        wrappers = [o for o in (engine.d_optimizer, engine.aux_optimizer) if o is not None]
        parts = [p for o in wrappers for p in getattr(o, "chained_optimizers", [o]) if not p.is_stub_optimizer]
        optimizers = [p.optimizer for p in parts]
        models = {id(t) for c in engine._models() for t in c.module.parameters()}
    else:  # DeepSpeed: its engines' torch optimizers (steps flat fp32 partitions)
        optimizers = [e.basic_optimizer for e in (engine.d, engine.aux) if e is not None]
        models = {id(t) for e in (engine.d, engine.aux) if e is not None for t in e.module.parameters()}
    masters = [t for o in optimizers for g in o.param_groups for t in g["params"]
               if id(t) not in models and t._base is None]  # copies, not views of the model's weights
    tensors = optimizer_state_tensors(optimizers) + masters
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _worker(rank, world_size, args, zero):
    import numpy as np

    from spactor_mega.data.dataset import SpactorBatchBuilder
    from spactor_mega.data.span_corruption import SpanCorruption, sample_keys
    from spactor_mega.curriculum import Phase
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine
    from spactor_mega.plan.memory import model_state_bytes

    cfg = _config(args, zero)
    initialize_parallel(1, 1, cfg.train.seed)
    try:
        corruption = SpanCorruption(args.seq, SP_SIZE + 99)
        builder = SpactorBatchBuilder(corruption, SP_SIZE, 0.15)
        rng = np.random.default_rng(rank)
        batches = [builder(rng.integers(3, SP_SIZE, (args.batch, corruption.raw_length)),
                           sample_keys(rank, np.arange(i * args.batch, (i + 1) * args.batch)), with_mlm=True)
                   for i in range(args.steps)]
        objective = SpactorObjective.from_config(cfg, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)

        d, g, rtd = build_spactor_modules(cfg, VOCAB, with_generator=True)
        params = sum(p.numel() for m in (d, g, rtd) for p in m.parameters())
        before = _rss_mb()
        engine = build_engine(cfg, d, g, rtd, objective, False)
        del d, g, rtd
        times = []
        for batch in batches:
            start = time.perf_counter()
            engine.train_step([batch], Phase.HYBRID)
            times.append(time.perf_counter() - start)
        estimate = model_state_bytes(cfg, params, 2)
        return {"peak": _peak_mb(), "increase": _peak_mb() - before, "params": params,
                "optimizer_state": _optimizer_state_mb(engine),
                "estimate": sum(sum(v.values()) for v in estimate.values()) / 2**20,
                "step": statistics.median(times[1:])}
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the setups whose name contains this (the baseline always runs)")
    args = parser.parse_args()
    rows, baseline = [], None
    for name, zero in [s for s in SETUPS if s[1] is None or args.only in s[0]]:
        results = run_distributed(_worker, 2, args, zero, timeout=900)
        worst = {k: max(r[k] for r in results) for k in ("peak", "increase", "estimate", "step", "optimizer_state")}
        baseline = baseline or worst
        rows.append([name, f"{worst['peak']:,.0f}", f"{worst['increase']:,.0f}",
                     f"{worst['increase'] / baseline['increase']:.2f}", f"{worst['estimate']:,.0f}",
                     f"{worst['optimizer_state']:,.0f}", f"{worst['step']:.3f}", f"{worst['step'] / baseline['step']:.2f}"])
        print(json.dumps({"setup": name, **worst}), flush=True)
    where = "GPU" if __import__("torch").cuda.is_available() else "CPU RSS"
    params = results[0]["params"]
    table(
        f"memory and step time per rank, 2 DP ranks, d_model {args.d_model}, {args.layers}+{args.layers} layers, "
        f"vocab {VOCAB}, {params / 1e6:.1f}M params (D + G + RTD head), batch {args.batch} x {args.seq}, fp32, stage 1",
        ["setup", f"peak {where} MB", "increase MB", "vs baseline", "model-state estimate MB", "optimizer state MB",
         "s/step", "vs baseline"],
        rows,
    )
    print("increase: peak minus the process's memory before the engine was built (model states, gradients, "
          "activations, communication buffers); estimate: our --dry-run model-state figure (GPU + CPU); optimizer "
          "state: the tensors this rank's optimizers hold (moments, steps, fp32 masters that are copies).")


if __name__ == "__main__":
    main()
