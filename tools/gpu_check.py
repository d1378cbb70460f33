#!/usr/bin/env python
"""The first check on a GPU, one command, under 8 minutes on one H100/H200:

    python tools/gpu_check.py [--work DIR]      # on a machine with one CUDA GPU
    python tools/gpu_check.py --smoke           # every part at a tiny size on the CPU (what a test runs)

Parts, each reported as one line of the summary (and tables where it measures):

- ``bench``: ``tools/bench_gpu.py`` for T5-small and T5-base (tokens/s, MFU, peak memory beside the
  dry run's prediction, HF T5 of the same shape as the baseline);
- ``train``: ``spactor train`` of the demo model, 50 bf16 steps across tau (25) with async saves every
  10 steps, stopped at step 30 and resumed to 50 (losses finite, the resume at 30, checkpoint 50 published);
- ``attention``: the SDPA kernels one training step of D actually dispatches (torch.profiler event
  names; the math fallback alone fails on a GPU);
- ``sync``: ``torch.cuda.set_sync_debug_mode("warn")`` over one hybrid and one SC-only step: the
  synchronizing CUDA calls, counted (reported, not failed: issue 19 removes the per-micro-batch ones);
- ``vocab``: the LM head's GEMM at TP=8's vocabulary shard (4016 rows) against the same GEMM
  padded to a multiple of 128 (4096): time per useful FLOP, to settle whether padding each shard pays;
- ``tf32``: an fp32 matmul with ``train.allow_tf32`` off and on (``training.numerics``);
- ``memory``: the dry run's activation estimate for the GPU's attention kernel (``plan/memory.py``)
  against the bytes autograd keeps for D on the GPU (``tools/bench_scale.py --parts d``'s shapes and kinds);
  fails outside 10% (the CPU suite holds the CPU form to the byte; the GPU form is derived, unmeasured).

Exits 1 when a part fails (an exception, a non-finite loss, a wrong resume, the math attention
fallback on a GPU). Without a GPU and without ``--smoke`` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from bench_gpu import HEADER, bench_rows, build_bench_engine, preset  # noqa: E402
from bench_train import batches  # noqa: E402
from benchlib import table  # noqa: E402
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.parallel.state import destroy_parallel  # noqa: E402
from spactor_mega.training.loop import on_device  # noqa: E402
from spactor_mega.training.numerics import set_float_numerics  # noqa: E402
from tests.plan.test_activation_memory import KINDS, SHAPES, activation_rows  # noqa: E402

CUDA = torch.cuda.is_available()


class CheckFailed(Exception):
    """A part ran but its result is wrong."""


# ---------------------------------------------------------------------------------------------
def check_bench(smoke: bool) -> str:
    presets, batch, steps = (["t5-small"], 2, 1) if smoke else (["t5-small", "t5-base"], 16, 10)
    rows, peak = bench_rows(presets, batch, steps, smoke)
    table(f"bench_gpu: bf16 step, batch {batch} (peak {peak or 'unknown'} TFLOP/s)", HEADER, rows)
    best = max(rows, key=lambda row: float(row[3].replace(",", "")))
    return f"{len(rows)} rows; fastest {best[0]} {best[1]}: {best[3]} tokens/s, MFU {best[5]}"


# ---------------------------------------------------------------------------------------------
def _train_flags(work: Path, smoke: bool) -> list[str]:
    """The demo preset on a small tokenizer (built from the embedded validation shard), 50 bf16
    steps with tau 25 and async saves every 10 (smoke: a tiny model, 6 steps, tau 3, saves every 2)."""
    steps, tau, every = (6, 3, 2) if smoke else (50, 25, 10)
    flags = ["--config", str(ROOT / "configs" / "demo-cpu.yaml"),
             "--data.tokenizer", str(work / "tokenizer"), "--data.tokenizer_vocab_size", "600",
             "--data.train_corpus", str(ROOT / "data" / "demo_c4" / "c4-validation.*.json.gz"),
             "--data.valid_corpus", "", "--data.valid_data", "", "--data.split", "95,5,0",
             "--data.train_data", str(work / "data" / "train_docs"),
             "--train.steps", str(steps), "--spactor.tau", str(tau), "--train.precision", "bf16",
             "--train.save_interval", str(every), "--train.async_save", "true", "--train.eval_interval", "0",
             "--train.save_dir", str(work / "run" / "checkpoints"),
             "--logging.tensorboard_dir", str(work / "run" / "tb"),
             "--logging.metrics_file", str(work / "run" / "metrics.jsonl"), "--logging.progress", "false"]
    if smoke:
        flags += ["--model.d_model", "32", "--model.d_kv", "8", "--model.d_ff", "64", "--model.num_heads", "4",
                  "--model.num_encoder_layers", "2", "--model.num_decoder_layers", "2",
                  "--data.encoder_seq_length", "32", "--train.global_batch_size", "4", "--train.micro_batch_size", "4"]
    return flags


def _spactor_train(flags: list[str]) -> str:
    run = subprocess.run([sys.executable, "-m", "spactor_mega.cli", "train", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=420)
    if run.returncode != 0:
        raise CheckFailed(f"spactor train exited {run.returncode}: {(run.stderr or run.stdout).strip()[-400:]}")
    return run.stdout + run.stderr


def check_train(work: Path, smoke: bool) -> str:
    shutil.rmtree(work / "run", ignore_errors=True)  # a run of an earlier check (the data is kept)
    flags = _train_flags(work, smoke)
    steps = int(flags[flags.index("--train.steps") + 1])
    tau = float(flags[flags.index("--spactor.tau") + 1])
    stop_at = steps * 3 // 5  # 30 of 50 (smoke: 3 of 6), down to a multiple of the save interval
    stop_at -= stop_at % int(flags[flags.index("--train.save_interval") + 1])
    _spactor_train(flags + ["--train.exit_interval", str(stop_at)])
    second = _spactor_train(flags + ["--train.resume", "auto"])
    if f"at step {stop_at}" not in second or "resumed from" not in second:
        raise CheckFailed(f"the second run did not resume at step {stop_at}: {second.strip()[-300:]}")
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r.get("split") == "train"}
    if sorted(train) != list(range(1, steps + 1)):
        raise CheckFailed(f"train steps logged: {sorted(train)}, expected 1..{steps}")
    bad = [s for s, r in train.items() if not math.isfinite(r["loss"])]
    if bad:
        raise CheckFailed(f"non-finite loss at steps {bad}")
    hybrid = [s for s, r in train.items() if "rtd_loss" in r]
    if not hybrid or max(hybrid) > tau:
        raise CheckFailed(f"the hybrid phase's steps {hybrid} do not end at tau {tau}")
    if not (work / "run" / "checkpoints" / f"iter_{steps:07d}").is_dir():
        raise CheckFailed(f"checkpoint iter_{steps:07d} not published")
    return (f"{steps} bf16 steps, tau {tau:g}, async saves, stopped at {stop_at} and resumed; "
            f"loss {train[1]['loss']:.3f} -> {train[steps]['loss']:.3f}")


# ---------------------------------------------------------------------------------------------
def _bench_engine_steps(smoke: bool):
    """Our engine on T5-small's shape (smoke: tiny) and one hybrid and one SC-only micro-batch."""
    cfg = preset("t5-small", 2 if smoke else 8, smoke)
    engine = build_bench_engine(cfg)
    hybrid = on_device(batches(cfg, 1, True)[0][0])
    sc_only = on_device(batches(cfg, 1, False)[0][0])
    return engine, hybrid, sc_only


def check_attention(smoke: bool) -> str:
    engine, hybrid, _ = _bench_engine_steps(smoke)
    try:
        engine.train_step([hybrid], Phase.HYBRID)  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
        with torch.profiler.profile(activities=activities) as prof:
            engine.train_step([hybrid], Phase.HYBRID)
    finally:
        del engine
        destroy_parallel()
    names = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key
                    and e.key != "aten::scaled_dot_product_attention"})
    if not names:
        raise CheckFailed("no SDPA kernel in the profile")
    if CUDA and all("math" in name for name in names):
        raise CheckFailed(f"only the math fallback dispatched: {names}")
    return ", ".join(name.removeprefix("aten::") for name in names)


# ---------------------------------------------------------------------------------------------
SYNC_WARNING = "synchronizing CUDA operation"


def count_sync_warnings(step) -> int:
    """Runs ``step()`` with CUDA's sync debug mode on "warn" (on a GPU) and counts its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            if CUDA:
                torch.cuda.synchronize()
        finally:
            if CUDA:
                torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def check_sync(smoke: bool) -> str:
    engine, hybrid, sc_only = _bench_engine_steps(smoke)
    try:
        engine.train_step([hybrid], Phase.HYBRID)  # warm-up: lazy initialisation syncs once
        per_hybrid = count_sync_warnings(lambda: engine.train_step([hybrid], Phase.HYBRID))
        engine.release_generator()
        engine.train_step([sc_only], Phase.SC_ONLY)
        per_sc = count_sync_warnings(lambda: engine.train_step([sc_only], Phase.SC_ONLY))
    finally:
        del engine
        destroy_parallel()
    where = "" if CUDA else " (CPU: no sync debug mode, the step ran without it)"
    return f"synchronizing calls per step: hybrid {per_hybrid}, SC only {per_sc}{where}"


# ---------------------------------------------------------------------------------------------
def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``a @ b`` (CUDA events on a GPU)."""
    a @ b  # warm-up: cuBLAS picks its kernel
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_vocab_shard(smoke: bool) -> str:
    """T5-base's LM head at TP=8, micro-batch 16 x 114 decoder tokens: [tokens, 768] @ [768, rows]."""
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    tokens, d, shard = (64, 32, 40) if smoke else (16 * 114, 768, 32128 // 8)
    padded = -(-shard // 128) * 128
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    rows = []
    for n in (shard, padded):
        w = torch.randn(d, n, device=device, dtype=dtype)
        seconds = _matmul_seconds(x, w, 5 if smoke else 50)
        rows.append([n, f"{seconds * 1e6:.1f}", f"{2 * tokens * d * shard / seconds / 1e12:.1f}"])
    table(f"LM head GEMM at one vocabulary shard ({device}, {dtype})", ["rows", "us", "useful TFLOP/s"], rows)
    return f"{shard} rows {rows[0][1]} us, padded to {padded}: {rows[1][1]} us"


def check_tf32(smoke: bool) -> str:
    n = 64 if smoke else 8192
    device = "cuda" if CUDA else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    measured = {}
    try:
        for allow in (False, True):
            set_float_numerics(cuda=True, allow_tf32=allow)  # the trainer's setting; on a CPU it changes nothing
            measured[allow] = 2 * n ** 3 / _matmul_seconds(a, b, 3 if smoke else 10) / 1e12
    finally:
        set_float_numerics(cuda=True, allow_tf32=True)
    return f"fp32 {n}x{n} matmul: {measured[False]:.1f} TFLOP/s IEEE, {measured[True]:.1f} TFLOP/s TF32"


def check_activation_memory(smoke: bool) -> str:
    shapes = SHAPES[:1] if smoke else SHAPES + KINDS  # KINDS: the ReLU MLP, UMT5's per-layer bias
    rows = [[shape.name, precision, recompute, f"{estimate:,.0f}", f"{measured:,}", f"{estimate / measured:.4f}"]
            for shape, precision, recompute, estimate, measured in activation_rows(shapes, "cuda" if CUDA else "cpu")]
    table("D's activations kept for backward: the dry run's estimate against autograd",
          ["shape", "precision", "model.recompute", "estimate bytes", "measured bytes", "estimate / measured"], rows)
    worst = max(rows, key=lambda r: abs(float(r[-1]) - 1))
    if abs(float(worst[-1]) - 1) > 0.1:
        raise CheckFailed(f"activation estimate off by more than 10%: {worst}")
    return f"{len(rows)} cases, worst estimate / measured {worst[-1]} ({worst[0]} {worst[1]} {worst[2]})"


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part at a tiny size on the CPU (checks the script)")
    parser.add_argument("--work", help="folder for the training part's data and run (default: a temporary one)")
    parser.add_argument("--parts", default="bench,train,attention,sync,vocab,tf32,memory",
                        help="comma-separated subset of the parts")
    args = parser.parse_args(argv)
    if not CUDA and not args.smoke:
        print("gpu_check: no CUDA GPU here; nothing checked (use --smoke to run every part tiny on the CPU)")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        parts = {
            "bench": lambda: check_bench(args.smoke),
            "train": lambda: check_train(work, args.smoke),
            "attention": lambda: check_attention(args.smoke),
            "sync": lambda: check_sync(args.smoke),
            "vocab": lambda: check_vocab_shard(args.smoke),
            "tf32": lambda: check_tf32(args.smoke),
            "memory": lambda: check_activation_memory(args.smoke),
        }
        wanted = [p.strip() for p in args.parts.split(",")]
        unknown = set(wanted) - set(parts)
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(parts)}")
        summary = []
        for name in wanted:
            start = time.perf_counter()
            try:
                result, status = parts[name](), "ok"
            except CheckFailed as e:
                result, status = str(e), "FAIL"
            except Exception as e:  # a part that crashes is a failure of the check, reported with the others
                traceback.print_exc()
                result, status = f"{type(e).__name__}: {e}", "FAIL"
            summary.append([name, status, f"{time.perf_counter() - start:.0f}", result])
    device = torch.cuda.get_device_name() if CUDA else "cpu (smoke)"
    table(f"gpu_check on {device}, torch {torch.__version__}", ["part", "status", "s", "result"], summary)
    return 1 if any(row[1] == "FAIL" for row in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
