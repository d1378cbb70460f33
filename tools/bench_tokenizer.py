#!/usr/bin/env python
"""What a tokenizer that keeps any text costs and gains, beside T5's (the baseline) in the same run.

Trains both with ``spactor tokenizer train``'s code at one vocabulary size on the same files: T5's
settings, and ``--byte-fallback --keep-whitespace``. Then, on C4 text (the demo corpus's validation
split) and on code (this repository's Python files, less the few that spell ``<extra_id_k>`` or
U+2581, which T5 reserves), per tokenizer: characters per token, ``<unk>`` tokens, and texts that
``decode(encode(x))`` gives back exactly; and the training time (noisy on a shared machine).

Usage: python tools/bench_tokenizer.py [--train GLOB] [--valid GLOB] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402

from spactor_mega.data.c4 import expand_inputs  # noqa: E402
from spactor_mega.data.train_tokenizer import train_tokenizer  # noqa: E402

SETTINGS = {"T5 (baseline)": {}, "byte fallback + keep whitespace": dict(byte_fallback=True, keep_whitespace=True)}


def c4_texts(pattern: str) -> list[str]:
    texts = []
    for path in expand_inputs([pattern]):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def code_texts() -> list[str]:
    texts = [p.read_text() for p in sorted((ROOT / "spactor_mega").rglob("*.py"))]
    return [t for t in texts if t and "<extra_id_" not in t and "\u2581" not in t]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default=str(ROOT / "data/demo_c4/c4-train.*.json.gz"))
    parser.add_argument("--valid", default=str(ROOT / "data/demo_c4/c4-validation.*.json.gz"))
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    sets = {"C4 validation": c4_texts(args.valid), "Python files": code_texts()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in SETTINGS.items():
            started = time.perf_counter()
            tok = train_tokenizer([args.train], Path(tmp) / str(len(rows)), args.vocab_size, **settings)
            seconds = time.perf_counter() - started
            for set_name, texts in sets.items():
                ids = [tok.encode(t) for t in texts]
                tokens = sum(map(len, ids))
                exact = sum(tok.decode(i) == t for i, t in zip(ids, texts))
                rows.append([name, set_name, f"{sum(map(len, texts)) / tokens:.2f}",
                             sum(i.count(tok.unk_id) for i in ids), f"{exact}/{len(texts)}", f"{seconds:.0f}"])
    table(f"Tokenizers of {args.vocab_size} pieces trained on {args.train}",
          ["tokenizer", "text", "chars/token", "<unk>", "exact round trips", "train s"], rows)


if __name__ == "__main__":
    main()
