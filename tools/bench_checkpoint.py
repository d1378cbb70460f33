#!/usr/bin/env python
"""Checkpoint benchmark: how long a save stalls training, synchronous (the named baseline) vs
asynchronous (``train.async_save``: Megatron's async dist-checkpointing, shards written by a forked
process while training goes on), and how long a preemption signal takes to a clean exit.

A T5-base-shaped D (d_model 768, 12 + 12 layers, 32,128-row vocabulary, AdamW: a checkpoint of
weights and both moments), SC-only (tau 0), on the CPU, one process, on the demo corpus
(``runs/demo``, built by ``spactor prepare --config configs/demo-cpu.yaml`` or a demo run).

Per mode, one run of ``--steps`` steps saving every ``--save-interval`` steps and at the end:
- *in save()*: the time the loop waits in the engine's ``save`` (synchronous: the whole write;
  asynchronous: planning, the common state, the fork, and waiting for the save before it if that
  one is still being written);
- *stall per save*: that plus the per-step publishing checks (``complete_saves``: an all-reduce,
  and the finalize that writes the metadata, ``run.json`` and ``latest``), per save;
- *step after a save, extra*: the step after a save minus the median step after none: what the
  background writer, competing for the cores and the disk, adds to the next step (noisy on a
  shared machine).
Then the wall time from SIGTERM (sent to ``spactor train`` during step 3) to its exit with code 0,
having finished the step and saved (the asynchronous run waits for its save to be complete).

``--optimizer-memory``: instead, the host memory one rank holds while saving a distributed-optimizer
checkpoint: the demo model (configs/demo-cpu.yaml's shape, G and the RTD head included, AdamW, fp32)
at DP = 2 with ``parallel.distributed_optimizer``, one hybrid step on synthetic batches, then one
synchronous save, per format: megatron-core's "fully_reshardable" (memory-efficient variant: DP rank 0
gathers the group's fp32 parameters and moments over gloo; the format before, the named baseline)
and ours (every rank writes its own ranges: :mod:`spactor_mega.checkpoint.distributed_optimizer`).
Measured per rank as the peak of the process's RSS (``/proc/self/statm``, sampled every 0.5 ms by a
thread) during ``engine.save`` minus its RSS just before; the table shows the largest rank's, per D
parameter, and that rate times T5-xl's D parameter count (configs/t5-xl.yaml).

Usage: python tools/bench_checkpoint.py [--steps 7 --save-interval 2 --seq 64 --batch 2]
       python tools/bench_checkpoint.py --optimizer-memory [--seq 128 --batch 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import yaml

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402
from spactor_mega.config import Config, load_yaml  # noqa: E402
from spactor_mega.parallel.testing import run_distributed  # noqa: E402
from spactor_mega.plan.dry_run import parameter_counts  # noqa: E402
from spactor_mega.plan.memory import checkpoint_bytes  # noqa: E402

DEMO = ROOT / "configs" / "demo-cpu.yaml"
T5_XL = ROOT / "configs" / "t5-xl.yaml"
DEMO_VOCAB = 8192  # the demo tokenizer's 8,000 pieces, sentinels and mask, padded to a multiple of 128
BASE_SHAPE = dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12, num_decoder_layers=12,
                  vocab_size=32128)


def bench_config(work: Path, args, **train) -> Config:
    cfg = load_yaml(str(DEMO))
    cfg.model = dataclasses.replace(cfg.model, **BASE_SHAPE)
    cfg.data = dataclasses.replace(
        cfg.data, encoder_seq_length=args.seq, tokenizer=str(ROOT / cfg.data.tokenizer),
        train_data=[str(ROOT / p) for p in cfg.data.train_data], valid_data=[str(ROOT / p) for p in cfg.data.valid_data],
        train_corpus=[str(ROOT / p) for p in cfg.data.train_corpus],
        valid_corpus=[str(ROOT / p) for p in cfg.data.valid_corpus])
    cfg.spactor.tau = 0
    cfg.optim = dataclasses.replace(cfg.optim, optimizer="adamw")
    cfg.train = dataclasses.replace(cfg.train, **{
        "steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.batch,
        "save_dir": str(work / "ckpt"), "eval_interval": 0, "precision": "fp32", **train})
    cfg.logging = dataclasses.replace(cfg.logging, tensorboard_dir=str(work / "tb"), progress=False, log_interval=1)
    return cfg


def _train(rank, world_size, cfg):
    import torch

    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.engines.megatron import MegatronEngine
    from spactor_mega.training.loop import train

    torch.set_num_threads(os.cpu_count() or 1)
    spent = {"save": [], "complete": []}  # seconds the loop spent in each call

    def timed(name, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - start)
        return call

    MegatronEngine.save = timed("save", MegatronEngine.save)
    MegatronEngine.complete_saves = timed("complete", MegatronEngine.complete_saves)
    try:
        history = train(cfg).history
    finally:
        destroy_parallel()
    return {"step_s": [h["step_time_s"] for h in history], **spent}


def timings(cfg: Config) -> dict:
    return run_distributed(_train, 1, cfg, timeout=3600, threads=None)[0]


def seconds_to_exit(cfg: Config, work: Path, signal_after_step: int) -> tuple[float, int]:
    """SIGTERM to ``spactor train`` once it logged step ``signal_after_step``; (seconds to its exit, exit code)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    log = work / "sigterm.log"
    proc = subprocess.Popen([sys.executable, "-m", "spactor_mega.cli", "train", "--config", str(work / "config.yaml")],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    marker = f"[train] step {signal_after_step} "
    while marker not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"spactor train ended before step {signal_after_step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    return time.perf_counter() - sent, code


class PeakRss:
    """The peak of this process's RSS inside the ``with`` block above its RSS on entry, in bytes
    (sampled by a thread: the tensor work it watches releases the GIL)."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def now(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def __enter__(self):
        self.base = self.peak = self.now()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.0005):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def _megatron_fully_reshardable(optimizer, model_state: dict) -> dict:
    """The format before (baseline): megatron-core's own "fully_reshardable", memory-efficient variant."""
    return optimizer.sharded_state_dict(model_state, metadata={
        "distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True})


def _demo_config(work: Path, args) -> Config:
    cfg = load_yaml(str(DEMO))
    cfg.spactor.tau = 10  # the hybrid phase: G, the RTD head and their (plain) optimizer are saved too
    cfg.data = dataclasses.replace(cfg.data, encoder_seq_length=args.seq)
    cfg.optim = dataclasses.replace(cfg.optim, optimizer="adamw", warmup_steps=1)
    cfg.parallel = dataclasses.replace(cfg.parallel, distributed_optimizer=True)
    cfg.train = dataclasses.replace(cfg.train, micro_batch_size=args.batch, global_batch_size=2 * args.batch,
                                    precision="fp32", save_dir=str(work / "ckpt"))
    return cfg


def _save_memory(rank, world_size, cfg: Config, baseline: bool) -> dict:
    """One hybrid step on synthetic batches, then one save, in this rank: its RSS increase during the save."""
    import numpy as np

    from spactor_mega.checkpoint.store import make_record
    from spactor_mega.curriculum import Phase
    from spactor_mega.data.dataset import SpactorBatchBuilder
    from spactor_mega.data.span_corruption import SpanCorruption, sample_keys
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine
    from spactor_mega.training.engines import megatron as megatron_engine

    vocab, seq, batch = DEMO_VOCAB, cfg.data.encoder_seq_length, cfg.train.micro_batch_size
    initialize_parallel(1, 1, cfg.train.seed)
    try:
        if baseline:
            megatron_engine._distributed_optimizer_state = _megatron_fully_reshardable
        pieces = cfg.data.tokenizer_vocab_size  # as tools/bench_memory.py: sentinels above, then the mask
        corruption = SpanCorruption(seq, pieces + 99)
        tokens = np.random.default_rng(rank).integers(3, pieces, (batch, corruption.raw_length))
        micro_batch = SpactorBatchBuilder(corruption, pieces, 0.15)(
            tokens, sample_keys(rank, np.arange(batch)), with_mlm=True)
        objective = SpactorObjective.from_config(cfg, mask_id=pieces + 100, sample_vocab_size=pieces)
        d, g, rtd = build_spactor_modules(cfg, vocab, with_generator=True)
        d_params = sum(p.numel() for p in d.parameters())
        engine = build_engine(cfg, d, g, rtd, objective, False)
        del d, g, rtd
        engine.train_step([micro_batch], Phase.HYBRID)
        with PeakRss() as rss:
            engine.save(cfg.train.save_dir, 1, make_record(cfg, 1, vocab), None)
            engine.complete_saves(wait=True)
        return {"increase": rss.increase, "d_params": d_params}
    finally:
        destroy_parallel()


def optimizer_memory(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        xl = parameter_counts(load_yaml(str(T5_XL)), BASE_SHAPE["vocab_size"])["discriminator"]
        rows, baseline_worst = [], None
        for name, baseline in (('megatron-core "fully_reshardable" (baseline)', True), ("per-rank pieces (ours)", False)):
            here = work / ("baseline" if baseline else "ours")
            per_rank = run_distributed(_save_memory, 2, _demo_config(here, args), baseline, timeout=1800)
            shutil.rmtree(here, ignore_errors=True)
            worst, d_params = max(r["increase"] for r in per_rank), per_rank[0]["d_params"]
            baseline_worst = baseline_worst or worst
            rows.append([name, " / ".join(f"{r['increase'] / 2**20:.1f}" for r in per_rank), f"{worst / 2**20:.1f}",
                         f"{worst / baseline_worst:.2f}", f"{worst / d_params:.2f}", f"{worst / d_params * xl / 1e9:.1f}"])
        table(f"Host memory one rank holds while saving a distributed-optimizer checkpoint: demo model "
              f"(D {d_params / 1e6:.2f}M params + G + RTD head), DP = 2, AdamW fp32, CPU; "
              f"T5-xl: D {xl / 1e9:.2f}B params",
              ["format", "RSS increase in save, rank 0 / 1, MiB", "largest rank, MiB", "vs baseline",
               "bytes per D param", "T5-xl extrapolated, GB"], rows)
        print("T5-xl extrapolated = the largest rank's bytes per D parameter here x T5-xl's D parameters. The "
              "baseline's DP rank 0 gathers the fp32 parameter and both moments of all of D (12 bytes per "
              f"parameter whatever the DP size: {12 * xl / 1e9:.1f} GB for T5-xl) before the writer copies them; "
              "ours gathers nothing (each rank writes views of its own shard).")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--optimizer-memory", action="store_true",
                        help="the distributed optimizer's save memory per format instead (demo model, DP = 2)")
    args = parser.parse_args()
    if args.optimizer_memory:
        optimizer_memory(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    interval, steps = args.save_interval, args.steps
    if not 0 < interval < steps:
        raise SystemExit("--save-interval must leave at least one save before the last step")
    try:
        rows = []
        for mode, asynchronous in (("sync (baseline)", False), ("async", True)):
            here = work / mode.split()[0]
            spent = timings(bench_config(here, args, save_interval=interval, async_save=asynchronous))
            saves = spent["save"]  # the periodic ones and the final one
            # every step's publishing check, less the run's final wait (after the last step)
            stall = (sum(saves) + sum(spent["complete"][:-1])) / len(saves)
            times = spent["step_s"]  # times[s]: step s + 1, which includes the save after step s
            after_save = [times[s] for s in range(1, steps) if s % interval == 0]
            quiet = [times[s] for s in range(1, steps) if s % interval != 0]
            size = sum(f.stat().st_size for f in (here / "ckpt" / f"iter_{steps:07d}").rglob("*") if f.is_file())
            shutil.rmtree(here / "ckpt")
            exit_s, code = seconds_to_exit(bench_config(here, args, save_interval=0, async_save=asynchronous, steps=100),
                                           here, signal_after_step=2)
            rows.append([mode, f"{statistics.median(quiet):.2f}", f"{statistics.mean(saves):.2f}", f"{stall:.2f}",
                         f"{statistics.mean(after_save) - statistics.median(quiet):.2f}", f"{size / 1e9:.2f}",
                         f"{exit_s:.1f} (exit {code})"])
            shutil.rmtree(here, ignore_errors=True)
        estimate = checkpoint_bytes(bench_config(work, args), BASE_SHAPE["vocab_size"])
        table(f"Checkpoint stall, T5-base shape (D {BASE_SHAPE['d_model']}, 12+12 layers, AdamW, fp32), CPU "
              f"{os.cpu_count()} cores, batch {args.batch} x {args.seq}, a save every {interval} of {steps} steps "
              f"(estimate before training: {estimate / 1e9:.2f} GB)",
              ["mode", "step s (no save)", "in save() s", "stall s/save", "step after a save, extra s",
               "checkpoint GB", "SIGTERM -> exit s"], rows)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
