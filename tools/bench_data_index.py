#!/usr/bin/env python
"""Dataset index at C4 scale: the first build's seconds and each rank's transient memory, new vs baseline.

"baseline" is ``SpactorDataset`` as of commit 1e55a46 (``--baseline-ref``; loaded from git, so
the code measured is the code that ran): the document offsets and each epoch's order are
``.npy`` files of the cache folder, built by one process ("cold") and memory-mapped by every
rank ("warm"); the order is numpy's permutation of every chunk id, shuffled in the file's
pages; and Megatron's builder hands each split an ``np.arange`` of its documents. "new" is the
current one: the same offsets file, the order a permutation computed per sample (nothing to
build), the split's documents handed over as a range.

A synthetic Megatron indexed dataset (IndexedDatasetBuilder, tiny documents) is written to a
temporary folder at two sizes (``--docs`` and ``--fit-docs``); the chunk length is chosen so
that chunks per document match C4 en's (365M documents, 156B T5 tokens -> 275M chunks of 568
tokens; Dodge et al. 2021), so both the per-document and the per-chunk parts of the index scale
like C4's. Each row is a fresh process (``--ranks`` of them at once for the multi-rank rows: the
ranks of a node), measured from just before ``build_datasets`` to after the first train and
validation samples: start-up seconds, and memory above the process's state after its imports
(private pages: RssAnon; peak: RssAnon sampled every 3 ms, which can miss a transient of a few
ms; traced peak: the exact peak of numpy's and Python's allocations from tracemalloc, in a run of
its own per row, since tracing slows Python down). Mapped index pages are file pages (RssFile),
shared by the node's ranks through the page cache and reclaimable.

Extrapolation to C4 en: a line through the two sizes. Fixed costs (the offsets' build buffer of
``INDEX_BLOCK`` int64, 32 MB, once a sample has more documents than that; numpy's 2 MB-aligned
huge-page allocations) are its intercept, where scaling one size in proportion counts them once
per sample-sized slice of C4, so a smaller sample gives a larger estimate; the proportional
estimates from each size are printed beside it. Both sizes should exceed ``INDEX_BLOCK``
documents (4.2M), or the buffer grows with the sample and passes for a per-document cost. The baseline's
epoch order, whose random accesses make it super-linear, is measured at the full 275M chunks
in a process of its own, as is each order's per-sample lookup (and with ``--check-full-epoch``,
that the new order's 275M positions hit every chunk exactly once).

Every row is the fastest of ``--rounds`` interleaved rounds (other jobs on a shared machine can
only slow a run down); its memory figures are its own.

Usage: python tools/bench_data_index.py [--docs 20000000] [--fit-docs 5000000] [--ranks 4] [--rounds 2]
       [--skip-full-order] [--check-full-epoch]
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
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402
from spactor_mega.data.dataset import INDEX_BLOCK  # noqa: E402

C4_DOCS, C4_TOKENS, C4_CHUNK = 365_000_000, 156_000_000_000, 568
C4_CHUNKS = C4_TOKENS // C4_CHUNK
MEAN_DOC_TOKENS = 9  # with 12-token chunks: C4's 0.75 chunks per document
SEED, SPLIT = 1234, "98,2,0"
LOOKUPS = 100_000  # order[position] calls timed at C4 scale


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
    if args.worker == "baseline":
        build_datasets = baseline_module(args.baseline_ref).build_datasets
    else:
        from spactor_mega.data.dataset import build_datasets
    from spactor_mega.data.span_corruption import SpanCorruption

    corruption = SpanCorruption(args.encoder_length, 32000)
    if args.trace:
        tracemalloc.start()
    base = memory()
    start = time.perf_counter()
    # One train sample: the index does not depend on the length, and start-up reaches one epoch's order.
    train, valid = build_datasets([args.prefix], [], SPLIT, corruption, SEED, 1, 1000, args.cache_dir)
    built = time.perf_counter()
    train[0], valid[0]
    done = time.perf_counter()
    print(json.dumps({
        "construct_s": built - start, "startup_s": done - start, "base": base, "after": memory(),
        "builds": train.index_builds + valid.index_builds, "traced_peak": tracemalloc.get_traced_memory()[1],
        "chunks": train.chunks_per_epoch, "chunk_length": train.chunk_length,
    }))


def full_order(args) -> None:
    """The epoch-0 order at C4's chunk count: the baseline's file written once, or the new
    permutation; then ``order[position]`` for random positions, one at a time as samples read it
    (``--check-full-epoch``: instead, every position at once in blocks)."""
    from spactor_mega.data.index_cache import cached_array
    from spactor_mega.data.permutation import Permutation

    write_permutation = baseline_module(args.baseline_ref).write_permutation
    positions = np.random.default_rng(0).integers(0, C4_CHUNKS, LOOKUPS).tolist()
    base = memory()
    start = time.perf_counter()
    if args.worker == "order-baseline":
        order, _ = cached_array(Path(args.cache_dir) / "order.npy", (C4_CHUNKS,), np.int32,
                                lambda out: write_permutation(out, [SEED, 1, 0]))
    else:
        order = Permutation(C4_CHUNKS, [SEED, 1, 0])
    built = time.perf_counter() - start
    if args.check_full_epoch:
        return print(json.dumps({"startup_s": check_full_epoch(order), "base": base, "after": memory()}))
    start = time.perf_counter()
    for position in positions:
        int(order[position])
    lookup = (time.perf_counter() - start) / LOOKUPS
    print(json.dumps({"startup_s": built, "lookup_us": lookup * 1e6, "base": base, "after": memory()}))


def check_full_epoch(order) -> float:
    """Seconds to compute every position of the epoch in blocks; exits unless each chunk came once."""
    start = time.perf_counter()
    seen = np.zeros(C4_CHUNKS, dtype=bool)
    for first in range(0, C4_CHUNKS, 1 << 22):
        chunks = order[np.arange(first, min(first + (1 << 22), C4_CHUNKS))]
        if seen[chunks].any():
            sys.exit(f"the order repeats a chunk in positions {first}..")
        seen[chunks] = True
    if not seen.all():
        sys.exit("the order misses a chunk")
    return time.perf_counter() - start


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


def fit(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, slope per document) of the line through (documents, value) points."""
    slope, intercept = np.polyfit(list(points), list(points.values()), 1)
    return intercept, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000_000)
    parser.add_argument("--fit-docs", type=int, help="the second, smaller sample size (default: --docs / 4)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks of a node, started together")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its fastest")
    parser.add_argument("--baseline-ref", default="1e55a46")
    parser.add_argument("--skip-full-order", action="store_true", help="skip the 275M-chunk order rows")
    parser.add_argument("--check-full-epoch", action="store_true",
                        help="check that the new order's 275M positions hit every chunk once (~2 min)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--encoder-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker in ("baseline", "new"):
        return worker(args)
    if args.worker:
        return full_order(args)
    sizes = sorted({args.docs, args.fit_docs or args.docs // 4})
    if len(sizes) < 2:
        sys.exit("--fit-docs must differ from --docs: the extrapolation is a line through two sizes")
    if sizes[0] < INDEX_BLOCK:
        print(f"warning: {sizes[0]:,} documents fit in one offsets build block ({INDEX_BLOCK:,}): the block's "
              "fixed 32 MB then grows with the sample, so the line through the sizes counts it per document")

    variants = ("baseline", "new")
    names = {f"{v}, {kind}": (v, kind) for v in variants for kind in ("cold (builds)", "warm (maps)")}
    names |= {f"{v}, cold, {args.ranks} ranks at once": (v, "ranks") for v in variants} if args.ranks > 1 else {}
    rows: dict[int, dict[str, list[dict]]] = {docs: {} for docs in sizes}
    traced: dict[int, dict[str, int]] = {docs: {} for docs in sizes}  # exact peaks, from one traced run
    full: dict[str, dict] = {}

    def best(found: dict, name: str, results: list[dict]) -> None:
        """Keeps the round whose slowest rank started fastest: other jobs only slow a run down."""
        if name not in found or max(r["startup_s"] for r in results) < max(r["startup_s"] for r in found[name]):
            found[name] = results

    with tempfile.TemporaryDirectory(prefix="bench_data_index_") as tmp:
        corpora = {}
        for docs in sizes:
            prefix = str(Path(tmp) / f"synthetic{docs}")
            start = time.perf_counter()
            corpora[docs] = prefix, encoder_length_for(docs, write_synthetic(prefix, docs))
            print(f"synthetic dataset: {docs:,} documents, {os.path.getsize(prefix + '.bin') / 1e9:.2f} GB .bin, "
                  f"written in {time.perf_counter() - start:.0f} s", flush=True)
        for round_ in range(args.rounds):
            for docs, (prefix, encoder_length) in corpora.items():
                for name, (variant, kind) in names.items():
                    cache = str(Path(tmp) / f"cache{round_}-{docs}-{variant}-{kind == 'ranks'}")
                    command = ["--worker", variant, "--prefix", prefix, "--encoder-length", str(encoder_length),
                               "--baseline-ref", args.baseline_ref, "--cache-dir", cache]
                    best(rows[docs], name, run_workers(command, args.ranks if kind == "ranks" else 1))
                    if round_ == 0 and kind != "ranks":  # tracemalloc slows Python down: a run of its own
                        command[-1] = str(Path(tmp) / f"traced-{docs}-{variant}")
                        traced[docs][name] = run_workers(command + ["--trace"], 1)[0]["traced_peak"]
            for variant in () if args.skip_full_order else variants:
                cache = str(Path(tmp) / f"cache{round_}")
                command = ["--worker", f"order-{variant}", "--cache-dir", cache, "--baseline-ref", args.baseline_ref]
                best(full, variant, run_workers(command, 1))
                Path(cache, "order.npy").unlink(missing_ok=True)
        if args.check_full_epoch:
            full["new, every position computed and checked"] = run_workers(
                ["--worker", "order-new", "--check-full-epoch", "--baseline-ref", args.baseline_ref], 1)
    full = {name: results[0] for name, results in full.items()}

    def anon(r: dict) -> float:  # private memory the index left after start-up
        return r["after"]["RssAnon"] - r["base"]["RssAnon"]

    def peak(r: dict) -> float:  # private memory at its highest during start-up
        return r["peak_anon"] - r["base"]["RssAnon"]

    for docs in sizes:
        one = rows[docs]["new, cold (builds)"][0]
        print(f"\n{docs:,} documents: {one['chunks']:,} train chunks of {one['chunk_length']} tokens per epoch "
              f"({one['chunks'] / docs:.3f} per document; C4 en: {C4_CHUNKS / C4_DOCS:.3f})")
        table(f"(a) synthetic: {docs:,} documents, per rank (max over ranks started together)",
              ["variant", "start-up s", "private GB", "private peak GB", "traced peak GB", "mapped GB", "index files built"],
              [[name, f"{max(r['startup_s'] for r in results):.2f}", gb(max(map(anon, results))),
                gb(max(map(peak, results))), gb(traced[docs][name]) if name in traced[docs] else "-",
                gb(max(r["after"]["RssFile"] - r["base"]["RssFile"] for r in results)),
                sum(r["builds"] for r in results)] for name, results in rows[docs].items()])

    def c4(name: str, measure) -> float:
        """``measure`` of row ``name`` at C4 en's documents, on the line through the sample sizes."""
        intercept, slope = fit({docs: max(map(measure, rows[docs][name])) for docs in sizes})
        return intercept + slope * C4_DOCS

    def c4_traced(name: str) -> str:
        if name not in traced[sizes[0]]:
            return "-"
        intercept, slope = fit({docs: traced[docs][name] for docs in sizes})
        return gb(intercept + slope * C4_DOCS)

    def startup(name: str) -> float:
        """Start-up at C4: for the baseline's cold build, construction plus its order measured at 275M chunks."""
        variant = names[name][0]
        if variant == "baseline" and "cold" in name and variant in full:
            return c4(name, lambda r: r["construct_s"]) + full[variant]["startup_s"]
        return c4(name, lambda r: r["startup_s"])

    table(f"(b) extrapolated to C4 en ({C4_DOCS / 1e6:.0f}M documents, {C4_CHUNKS / 1e6:.0f}M chunks), per rank, "
          f"on the line through {' and '.join(f'{d / 1e6:g}M' for d in sizes)} documents; goal: < 30 s, < 1 GB peak",
          ["variant", "start-up s", "private GB", "private peak GB", "traced peak GB",
           *(f"traced peak GB, x{C4_DOCS / d:.0f} of {d / 1e6:g}M" for d in sizes)],
          [[name, f"{startup(name):.1f}", gb(c4(name, anon)), gb(c4(name, peak)), c4_traced(name),
            *(gb(traced[d][name] * C4_DOCS / d) if name in traced[d] else "-" for d in sizes)] for name in names])
    if full:
        table(f"(c) the epoch-0 order of {C4_CHUNKS:,} chunks, measured",
              ["variant", "seconds", "private GB", "private peak GB", "order[position] us"],
              [[k, f"{v['startup_s']:.1f}", gb(anon(v)), gb(peak(v)), f"{v['lookup_us']:.1f}" if "lookup_us" in v else "-"]
               for k, v in full.items()])


if __name__ == "__main__":
    main()
