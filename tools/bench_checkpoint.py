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

Usage: python tools/bench_checkpoint.py [--steps 7 --save-interval 2 --seq 64 --batch 2]
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
from spactor_mega.plan.memory import checkpoint_bytes  # noqa: E402

DEMO = ROOT / "configs" / "demo-cpu.yaml"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
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
