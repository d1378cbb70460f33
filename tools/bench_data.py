#!/usr/bin/env python
"""Data-path benchmark: preprocessing throughput and SC+MLM example building, with baselines.

(a) ``spactor preprocess`` end to end on the demo corpus, MB/s per worker, beside bare
    SentencePiece encoding of the same text in the same run (the ceiling: the same
    one-thread calls to numpy ids that the workers make), and the command's start-up
    time (a one-document run, process start to exit). Every figure is the best of 5 rounds
    that run all rows in turn, as other jobs on a shared machine can only slow a run down;
    "CPU vs bare" compares CPU seconds (the main process and its workers together).
(b) SC+MLM examples per second on one core at 512/114, beside a per-row numpy collator in
    the style of Hugging Face's Flax ``run_t5_mlm_flax.py`` ``DataCollatorForT5MLM`` (the one
    nanoT5 uses; re-implemented here for the comparison, SC only, as it does).
(c) The input pipeline in training: ``spactor train`` on configs/demo-cpu.yaml (tau at half the
    steps), the per-step wait for micro-batches (``data_wait_s``) with ``data.num_workers`` 0
    (baseline: built in the step) and 2 (built ahead), in interleaved rounds; the first step of
    a run (workers starting) is left out.

Usage: python tools/bench_data.py [--parts a,b,c] [--corpus GLOB] [--workers 1 2] [--batch 256]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402

from spactor_mega.data.span_corruption import SpanCorruption, sample_keys  # noqa: E402

# (a) runs first and must not inherit torch/Megatron (which spactor_mega.data.dataset imports):
# `spactor preprocess` never loads them, and forking workers from a process that has makes
# each fork several times slower. (b) imports it when it starts.


# (b) baseline: per-row span corruption as in HF's Flax T5 example -------------------------
def _per_row_noise_mask(length: int, rng: np.random.Generator) -> np.ndarray:
    num_noise = int(np.round(length * 0.15))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(np.round(num_noise / 3.0)), 1)

    def segmentation(items, segments):
        marks = np.arange(items - 1) < (segments - 1)
        rng.shuffle(marks)
        marks = np.pad(marks, [[1, 0]])
        segment_id = np.cumsum(marks)
        _, lengths = np.unique(segment_id, return_counts=True)
        return lengths

    noise = segmentation(num_noise, num_spans)
    clean = segmentation(length - num_noise, num_spans)
    interleaved = np.reshape(np.stack([clean, noise], axis=1), [num_spans * 2])
    starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros((length,), dtype=np.int8)
    indicator[starts] = True
    return np.equal(np.cumsum(indicator) % 2, 1)


def per_row_collator(raw: np.ndarray, first_sentinel: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    batch, length = raw.shape
    mask = np.asarray([_per_row_noise_mask(length, rng) for _ in range(batch)])

    def sentinel_ids(m):
        starts = m - np.roll(m, 1, axis=-1) * m
        starts[:, 0] = m[:, 0]
        ids = np.where(starts != 0, np.cumsum(starts, axis=-1), starts)
        return np.where(ids != 0, first_sentinel + 1 - ids, 0) - (m.astype(np.int8) - starts)

    def filtered(ids):
        tokens = np.where(ids != 0, ids, raw)
        tokens = tokens[tokens >= 0].reshape((batch, -1))
        return np.concatenate([tokens, np.full((batch, 1), 1, dtype=np.int64)], axis=-1)

    m = mask.astype(np.int8)
    return filtered(sentinel_ids(m)), filtered(sentinel_ids((~mask).astype(np.int8)))


def bench_examples(batch: int, seconds: float = 3.0) -> list[list]:
    from spactor_mega.data.dataset import SpactorBatchBuilder

    sc = SpanCorruption(512, first_sentinel_id=32099)
    builder = SpactorBatchBuilder(sc, sp_size=32000, mlm_fraction=0.15)
    rng = np.random.default_rng(0)
    raw = rng.integers(3, 32000, size=(batch, sc.raw_length))
    base = per_row_collator(raw, 32099, rng)
    assert base[0].shape == (batch, 512) and base[1].shape == (batch, 114)

    def rate(fn) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(done)
            done += batch
        return done / (time.perf_counter() - start)

    ours_sc = rate(lambda i: builder(raw, sample_keys(1, np.arange(i, i + batch)), with_mlm=False))
    ours_mlm = rate(lambda i: builder(raw, sample_keys(1, np.arange(i, i + batch)), with_mlm=True))
    theirs = rate(lambda i: per_row_collator(raw, 32099, rng))
    return [
        ["per-row numpy collator (HF Flax T5 / nanoT5 style), SC only", f"{theirs:,.0f}", "1.00x"],
        ["spactor_mega SpactorBatchBuilder, SC only", f"{ours_sc:,.0f}", f"{ours_sc / theirs:.2f}x"],
        ["spactor_mega SpactorBatchBuilder, SC + MLM (stage 1)", f"{ours_mlm:,.0f}", f"{ours_mlm / theirs:.2f}x"],
    ]


# (c) the input pipeline in training ---------------------------------------------------------
def _train_history(rank: int, world_size: int, cfg) -> list[dict]:
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    try:
        return train(cfg).history
    finally:
        destroy_parallel()


def bench_data_wait(loader_workers: list[int], steps: int, rounds: int, work: Path) -> tuple[list[list], str]:
    """``rounds`` interleaved demo runs per worker count; per phase, the mean and median wait and
    the median step time over every run's steps but its first."""
    from spactor_mega.config import load_yaml
    from spactor_mega.parallel.testing import run_distributed

    cfg = load_yaml(ROOT / "configs" / "demo-cpu.yaml")
    shape = (f"d_model {cfg.model.d_model}, {cfg.model.num_encoder_layers}+{cfg.model.num_decoder_layers} layers, "
             f"batch {cfg.train.global_batch_size} x {cfg.data.encoder_seq_length}")
    cfg.train.steps, cfg.spactor.tau = steps, steps // 2
    cfg.train.save_interval, cfg.train.eval_interval = 0, 0
    cfg.train.save_dir, cfg.logging.tensorboard_dir = str(work / "ckpt"), str(work / "tb")
    cfg.logging.progress, cfg.logging.log_interval = False, steps
    histories: dict[int, list[dict]] = {w: [] for w in loader_workers}
    for _ in range(rounds):
        for workers in loader_workers:
            cfg.data.num_workers = workers
            # threads=None: torch's default threads, as `spactor train` runs on this machine
            histories[workers] += run_distributed(_train_history, 1, cfg, threads=None, timeout=3600)[0][1:]
    rows = []
    for phase, name in ((1.0, "1 (hybrid: SC + MLM)"), (2.0, "2 (SC only)")):
        for workers in loader_workers:
            steps_ = [h for h in histories[workers] if h["phase"] == phase]
            wait = [h["data_wait_s"] * 1e3 for h in steps_]
            step_ms = statistics.median(h["step_time_s"] * 1e3 for h in steps_)
            rows.append([name, f"{workers}{' (baseline)' if workers == 0 else ''}", len(steps_),
                         f"{statistics.mean(wait):.2f}", f"{statistics.median(wait):.2f}", f"{step_ms:.1f}",
                         f"{statistics.mean(wait) / step_ms:.1%}"])
    return rows, shape


# (a) preprocessing ------------------------------------------------------------------------
def corpus_texts(pattern: str) -> tuple[list[str], list[Path]]:
    files = sorted(ROOT.glob(pattern))
    texts = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts, files


def bench_preprocess(pattern: str, workers_list: list[int], tokenizer: Path, work: Path,
                     rounds: int = 5) -> list[list]:
    """Best of ``rounds`` for every row; a round runs each row once, interleaved, so a shared
    machine's changing load falls on the baseline and on ours alike (load only slows a run)."""
    import sentencepiece as spm

    from spactor_mega.data.preprocess import _encoder, preprocess

    texts, files = corpus_texts(pattern)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    encode = _encoder(sp)  # the very calls the workers make: one thread, ids to numpy
    one_doc = work / "one.jsonl"
    one_doc.write_text(json.dumps({"text": "one short document", "timestamp": "", "url": ""}) + "\n")

    def cpu() -> float:  # this process and its finished children (the workers, once joined)
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    jobs = {
        "bare": lambda: encode(texts),
        "startup": lambda: subprocess.run(
            [sys.executable, "-m", "spactor_mega.cli", "preprocess", "--input", str(one_doc), "--output-prefix",
             str(work / "one"), "--tokenizer", str(tokenizer), "--force", "--no-progress"],
            check=True, capture_output=True, cwd=ROOT,
        ),
    }
    for workers in workers_list:
        jobs[workers] = lambda workers=workers: preprocess(
            [str(f) for f in files], str(work / f"w{workers}"), str(tokenizer), workers=workers, force=True,
            progress=False)
    seconds: dict = {name: [] for name in jobs}
    cpu_seconds: dict = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start, start_cpu = time.perf_counter(), cpu()
            job()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(cpu() - start_cpu)

    bare = mb / min(seconds["bare"])
    startup = min(seconds["startup"])
    rows = [["bare SentencePiece encode (1 thread, in memory)", "1", f"{bare:.2f}", "1.00", "1.00", "-"]]
    for workers in workers_list:
        per_worker = mb / min(seconds[workers]) / workers
        rows.append(["spactor preprocess (json.gz, end to end)", str(workers), f"{per_worker:.2f}",
                     f"{per_worker / bare:.2f}", f"{min(cpu_seconds['bare']) / min(cpu_seconds[workers]):.2f}",
                     f"{startup:.2f} s"])
    return rows, mb


def bench_preprocess_table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = Path(args.tokenizer) if args.tokenizer else None
        if tokenizer is None:
            from spactor_mega.data.train_tokenizer import train_tokenizer

            train_tokenizer([str(ROOT / args.corpus)], work / "tok", vocab_size=8000)
            tokenizer = work / "tok" / "spiece.model"
        rows, mb = bench_preprocess(args.corpus, args.workers, tokenizer, work)
        table(f"(a) preprocessing {mb:.1f} MB of text, best of 5 interleaved rounds; goal: >= 0.80 of bare SentencePiece "
              "per worker, start-up < 2 s",
              ["pipeline", "workers", "MB/s per worker", "vs bare", "CPU vs bare", "start-up"], rows)
        print("CPU vs bare: bare encode's CPU seconds / ours (main process and workers together);\n"
              "wall-clock per worker can only reach it when every process has a core of its own.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/demo_c4/c4-train.*.json.gz", help="glob under the repo root")
    parser.add_argument("--tokenizer", help="spiece.model (default: train an 8k one on the corpus)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256, help="examples per SC batch")
    parser.add_argument("--parts", default="a,b,c", help="which tables: a (preprocess), b (examples), c (data wait)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="(c) data.num_workers; 0 first")
    parser.add_argument("--steps", type=int, default=60, help="(c) training steps per run (tau at half)")
    parser.add_argument("--rounds", type=int, default=2, help="(c) runs per worker count, interleaved")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, numpy {np.__version__}")
    if "a" in parts:
        bench_preprocess_table(args)
    if "b" in parts:
        table(f"(b) SC(+MLM) examples at 512/114, one core, batch {args.batch}; goal: >= 20,000/s",
              ["builder", "examples/s", "vs baseline"], bench_examples(args.batch))
    if "c" in parts:
        os.chdir(ROOT)  # the demo preset's paths are relative to the repository
        with tempfile.TemporaryDirectory() as tmp:
            rows, shape = bench_data_wait(args.loader_workers, args.steps, args.rounds, Path(tmp))
        table(f"(c) per-step wait for micro-batches in `spactor train`, demo preset ({shape}), {args.steps} steps, "
              f"tau {args.steps // 2}, {args.rounds} interleaved runs per row; first step of each run left out",
              ["stage", "data.num_workers", "steps", "wait mean ms", "wait median ms", "step median ms",
               "wait / step"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
