#!/usr/bin/env python
"""Dataset index at C4 scale: start-up seconds and per-rank memory, before and after the cache.

"before" is ``SpactorDataset`` as of commit b8d1465 (``--baseline-ref``; loaded from git, so the
code measured is the code that ran): every rank builds int64 document ids and offsets and, at its
first sample, the epoch's permutation, in its own memory. "after" is the current one: the index
lives in ``.npy`` files of the cache folder, built by one process ("cold") and memory-mapped by
every rank ("warm": the files exist, as for every rank but the builder and every later run).

A synthetic Megatron indexed dataset (IndexedDatasetBuilder, ``--docs`` tiny documents) is
written to a temporary folder; the chunk length is chosen so that chunks per document match
C4 en's (365M documents, 156B T5 tokens -> 275M chunks of 568 tokens; Dodge et al. 2021), so
both the per-document and the per-chunk parts of the index scale like C4's. Each row is a fresh
process (``--ranks`` of them at once for the multi-rank rows: the ranks of a node), measured
from just before ``build_datasets`` to after the first train and validation samples:
start-up seconds, and memory above the process's state after its imports (private pages:
RssAnon; peak: VmHWM). Mapped index pages are file pages (RssFile), shared by the node's ranks
through the page cache and reclaimable.

Extrapolation to C4 en: memory and start-up time scale linearly with the documents (an upper
bound for the fixed costs), except the epoch permutation, whose random accesses make it
super-linear: it is measured at the full 275M chunks in a process of its own.

Every row is the fastest of ``--rounds`` interleaved rounds (other jobs on a shared machine can
only slow a run down); its memory figures are its own.

Usage: python tools/bench_data_index.py [--docs 20000000] [--ranks 4] [--rounds 2] [--skip-full-order]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402

C4_DOCS, C4_TOKENS, C4_CHUNK = 365_000_000, 156_000_000_000, 568
C4_CHUNKS = C4_TOKENS // C4_CHUNK
MEAN_DOC_TOKENS = 9  # with 12-token chunks: C4's 0.75 chunks per document
SEED, SPLIT = 1234, "98,2,0"


def memory() -> dict[str, int]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def write_synthetic(prefix: str, docs: int) -> int:
    """``docs`` documents of 1..17 random tokens (mean 9), in blocks of a million; the token count."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    total = 0
    for first in range(0, docs, 1 << 20):
        lengths = rng.integers(1, 2 * MEAN_DOC_TOKENS, size=min(1 << 20, docs - first))
        tokens = rng.integers(3, 32000, size=int(lengths.sum()), dtype=np.int64)
        builder.add_document(torch.from_numpy(tokens), lengths.tolist())
        total += len(tokens)
    builder.finalize(prefix + ".idx")
    return total


def encoder_length_for(docs: int, tokens: int) -> int:
    """The encoder length whose raw chunk gives C4's chunks per document on this corpus."""
    from spactor_mega.data.span_corruption import SpanCorruption

    target = tokens * C4_DOCS / C4_CHUNKS / docs
    return min(range(4, 64), key=lambda e: abs(SpanCorruption(e, 32000).raw_length - target))


def baseline_module(ref: str):
    """spactor_mega/data/dataset.py as of ``ref``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:spactor_mega/data/dataset.py"],
                            capture_output=True, text=True)
    if source.returncode:
        sys.exit(f"--baseline-ref {ref}: cannot read the baseline dataset.py from git ({source.stderr.strip()})")
    path = Path(tempfile.mkdtemp()) / "dataset_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("dataset_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def worker(args) -> None:
    """One rank: build the datasets, read a sample of each; print a JSON line of measures."""
    if args.worker == "before":
        build_datasets = baseline_module(args.baseline_ref).build_datasets
    else:
        from spactor_mega.data.dataset import build_datasets
    from spactor_mega.data.span_corruption import SpanCorruption

    corruption = SpanCorruption(args.encoder_length, 32000)
    base = memory()
    start = time.perf_counter()
    # One train sample: the index does not depend on the length, and start-up builds one epoch's order.
    train, valid = build_datasets([args.prefix], [], SPLIT, corruption, SEED, 1, 1000, args.cache_dir)
    built = time.perf_counter()
    train[0], valid[0]
    done = time.perf_counter()
    print(json.dumps({
        "construct_s": built - start, "startup_s": done - start, "base": base, "after": memory(),
        "builds": getattr(train, "index_builds", 0) + getattr(valid, "index_builds", 0),
        "chunks": train.chunks_per_epoch, "chunk_length": train.chunk_length,
    }))


def full_order(args) -> None:
    """The epoch-0 order at C4's chunk count: built per rank (before) or written once (after)."""
    base = memory()
    start = time.perf_counter()
    if args.worker == "order-before":
        order = np.random.default_rng([SEED, 1, 0]).permutation(C4_CHUNKS).astype(np.int32)  # b8d1465's _order
        del order
    else:
        from spactor_mega.data.dataset import write_permutation
        from spactor_mega.data.index_cache import cached_array

        cached_array(Path(args.cache_dir) / "order.npy", (C4_CHUNKS,), np.int32,
                     lambda out: write_permutation(out, [SEED, 1, 0]))
    print(json.dumps({"startup_s": time.perf_counter() - start, "base": base, "after": memory()}))


def run_workers(command: list[str], count: int) -> list[dict]:
    """``count`` copies of a worker started together; each one's measures, plus its peak private
    memory (RssAnon), sampled from here every few ms (numpy holds the GIL in a long operation, so
    a thread of the worker could not)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, *command], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(count)]
    peaks = [0] * count
    while any(proc.poll() is None for proc in procs):
        for i, proc in enumerate(procs):
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:  # exited
                continue
            anon = next((line for line in status.splitlines() if line.startswith("RssAnon:")), None)
            if anon:
                peaks[i] = max(peaks[i], int(anon.split()[1]) * 1024)
        time.sleep(0.003)
    results = []
    for proc, peak in zip(procs, peaks):
        out, _ = proc.communicate()
        if proc.returncode:
            sys.exit(f"worker {' '.join(command)} failed (exit {proc.returncode})")
        results.append(dict(json.loads(out.strip().splitlines()[-1]), peak_anon=peak))
    return results


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000_000)
    parser.add_argument("--ranks", type=int, default=4, help="ranks of a node, started together")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its fastest")
    parser.add_argument("--baseline-ref", default="b8d1465")
    parser.add_argument("--skip-full-order", action="store_true", help="skip the 275M-chunk permutation rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--encoder-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker in ("before", "after"):
        return worker(args)
    if args.worker:
        return full_order(args)

    with tempfile.TemporaryDirectory(prefix="bench_data_index_") as tmp:
        prefix = str(Path(tmp) / "synthetic")
        start = time.perf_counter()
        encoder_length = encoder_length_for(args.docs, write_synthetic(prefix, args.docs))
        print(f"synthetic dataset: {args.docs:,} documents, {os.path.getsize(prefix + '.bin') / 1e9:.2f} GB .bin, "
              f"written in {time.perf_counter() - start:.0f} s")

        def ranks(variant: str, count: int, cache: str | None = None) -> list[dict]:
            command = ["--worker", variant, "--prefix", prefix, "--encoder-length", str(encoder_length),
                       "--baseline-ref", args.baseline_ref]
            return run_workers(command + (["--cache-dir", cache] if cache else []), count)

        def best(rows: dict[str, list[dict]], name: str, results: list[dict]) -> None:
            """Keeps the round whose slowest rank started fastest: other jobs only slow a run down."""
            if name not in rows or max(r["startup_s"] for r in results) < max(r["startup_s"] for r in rows[name]):
                rows[name] = results

        rows, full = {}, {}
        for round_ in range(args.rounds):
            cache = str(Path(tmp) / f"cache{round_}")
            best(rows, "before, 1 rank", ranks("before", 1))
            best(rows, "after, cold (builds), 1 rank", ranks("after", 1, cache))
            best(rows, "after, warm (maps), 1 rank", ranks("after", 1, cache))
            if args.ranks > 1:
                best(rows, f"before, {args.ranks} ranks at once", ranks("before", args.ranks))
                best(rows, f"after, cold, {args.ranks} ranks at once", ranks("after", args.ranks, cache + "-ranks"))
            for variant in () if args.skip_full_order else ("order-before", "order-after"):
                result = run_workers(["--worker", variant, "--cache-dir", cache], 1)
                best(full, variant, result)
                Path(cache, "order.npy").unlink(missing_ok=True)
        full = {name: results[0] for name, results in full.items()}

    one = rows["before, 1 rank"][0]
    scale = C4_DOCS / args.docs
    print(f"\n{one['chunks']:,} train chunks of {one['chunk_length']} tokens per epoch "
          f"({one['chunks'] / args.docs:.3f} per document; C4 en: {C4_CHUNKS / C4_DOCS:.3f}); x{scale:.1f} to C4 en")

    def anon(r: dict) -> float:  # private memory the index left after start-up
        return r["after"]["RssAnon"] - r["base"]["RssAnon"]

    def peak(r: dict) -> float:  # private memory at its highest during start-up
        return r["peak_anon"] - r["base"]["RssAnon"]

    body = []
    for name, results in rows.items():
        body.append([name, f"{max(r['startup_s'] for r in results):.2f}", gb(max(map(anon, results))),
                     gb(max(map(peak, results))), gb(max(r["after"]["RssFile"] - r["base"]["RssFile"] for r in results)),
                     sum(r["builds"] for r in results) if name.startswith("after") else "each rank all"])
    table(f"(a) synthetic: {args.docs:,} documents, per rank (max over ranks started together)",
          ["variant", "start-up s", "private GB", "private peak GB", "mapped GB", "index files built"], body)

    def c4(name: str, order: str) -> list:
        """Memory scales linearly (arrays per document and per chunk); so does start-up time, but
        for the epoch order at the first sample where it is built: its time at C4's size."""
        r = rows[name][0]
        seconds = r["startup_s"] * scale
        if order in full:
            seconds = r["construct_s"] * scale + full[order]["startup_s"]
        return [name.removesuffix(", 1 rank"), f"{seconds:.1f}", gb(anon(r) * scale), gb(peak(r) * scale)]

    table(f"(b) extrapolated to C4 en ({C4_DOCS / 1e6:.0f}M documents, {C4_CHUNKS / 1e6:.0f}M chunks), per rank; "
          f"goal: < 1 GB, < 30 s", ["variant", "start-up s", "private GB", "private peak GB"],
          [c4("before, 1 rank", "order-before"), c4("after, cold (builds), 1 rank", "order-after"),
           c4("after, warm (maps), 1 rank", "")])
    before, cold, warm = (anon(rows[f"{name}, 1 rank"][0]) * scale
                          for name in ("before", "after, cold (builds)", "after, warm (maps)"))
    print(f"private index memory of a node of 8 ranks after start-up: before {gb(8 * before)} GB, "
          f"after {gb(cold + 7 * warm)} GB (one builder, seven mapping)")
    if full:
        table(f"(c) the epoch-0 order of {C4_CHUNKS:,} chunks, measured", ["variant", "seconds", "private peak GB"],
              [[k, f"{v['startup_s']:.1f}", gb(peak(v))] for k, v in full.items()])


if __name__ == "__main__":
    main()
