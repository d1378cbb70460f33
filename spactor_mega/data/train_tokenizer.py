"""``spactor tokenizer train``: a SentencePiece unigram model from C4 files, T5's conventions.

Writes ``OUT/spiece.model`` (pad 0, EOS 1, unk 2, no BOS), the file name Hugging Face's
``T5Tokenizer`` looks for; :class:`~spactor_mega.data.tokenizer.T5SentencePieceTokenizer`
adds the 100 sentinels above its pieces. ``--byte-fallback --keep-whitespace`` trains one that
keeps any text exactly (code, newlines, characters C4 lacks), see
:func:`~spactor_mega.data.tokenizer.train_sentencepiece`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator

from spactor_mega.data.c4 import ReadStats, expand_inputs, iter_documents
from spactor_mega.data.tokenizer import (
    KEEP_WHITESPACE_NEEDS_BYTES,
    MAX_SENTENCE_BYTES,
    T5SentencePieceTokenizer,
    train_sentencepiece,
)
from spactor_mega.errors import OutputExistsError, UserError

MODEL_FILE = "spiece.model"


def corpus_sentences(
    inputs: list[str], stats: ReadStats, json_keys=("text",), keep_whitespace: bool = False,
) -> Iterator[str]:
    """What SentencePiece trains on: the non-empty stripped lines of every document; or, for a tokenizer
    that keeps whitespace, runs of whole lines with their newlines and indentation (see :func:`_line_runs`)."""
    for path in expand_inputs(inputs):
        for _, text in iter_documents(path, json_keys, stats):
            if keep_whitespace:
                yield from _line_runs(text)
                continue
            for line in text.split("\n"):
                line = line.strip()
                if line:
                    yield line


def _line_runs(text: str) -> Iterator[str]:
    """A document as runs of consecutive lines of at most ``MAX_SENTENCE_BYTES``, newlines inside: so
    that newlines, blank lines and pieces such as ``.\\n`` are learnt (the trainer drops a sentence's
    trailing newline) and long documents still train (it skips a longer sentence: 36% of the demo
    corpus's bytes are in documents over 16 KB)."""
    run, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if run and size + n > MAX_SENTENCE_BYTES:
            yield "".join(run)
            run, size = [], 0
        run.append(line)
        size += n
    if run:
        yield "".join(run)


def train_tokenizer(
    inputs: list[str], output_dir: str | Path, vocab_size: int, threads: int = 2, max_sentences: int = 2_000_000,
    force: bool = False, byte_fallback: bool = False, keep_whitespace: bool = False,
) -> T5SentencePieceTokenizer:
    output_dir = Path(output_dir)
    target = output_dir / MODEL_FILE
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: exists; pass --force to overwrite it")
    stats = ReadStats()
    started = time.perf_counter()
    tmp_prefix = output_dir / ".spiece.tmp"
    model = train_sentencepiece(
        corpus_sentences(inputs, stats, keep_whitespace=keep_whitespace), tmp_prefix, vocab_size=vocab_size,
        num_threads=threads, input_sentence_size=max_sentences, byte_fallback=byte_fallback,
        keep_whitespace=keep_whitespace,
    )
    model.replace(target)
    Path(f"{tmp_prefix}.vocab").replace(output_dir / "spiece.vocab")
    tokenizer = T5SentencePieceTokenizer(target)
    report = stats.report()
    if report:
        print(report, file=sys.stderr)
    print(
        f"tokenizer: {target} ({tokenizer.sp_size} pieces + {tokenizer.num_sentinels} sentinels, "
        f"from {stats.docs} documents in {time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser(
        "train",
        help="train a unigram SentencePiece model on C4-format files",
        description="Train a unigram SentencePiece model on C4-format files with T5's ids "
        "(pad 0, EOS 1, unk 2, no BOS); writes OUT/spiece.model. Sentinels <extra_id_0..99> are "
        "added above the pieces by the tokenizer wrapper, numbered as Hugging Face's T5Tokenizer.",
        epilog="example: spactor tokenizer train --input 'data/demo_c4/c4-train.*.json.gz' "
        "--output-dir runs/demo/tokenizer --vocab-size 8000",
    )
    train.add_argument("--input", nargs="+", required=True, help="C4 .json/.jsonl/.json.gz files or globs")
    train.add_argument("--output-dir", required=True, help="folder to write spiece.model into")
    train.add_argument("--vocab-size", type=int, default=32000, help="pieces, without sentinels (default 32000, T5's)")
    train.add_argument("--threads", type=int, default=2, help="trainer threads (default 2)")
    train.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    train.add_argument("--force", action="store_true", help="overwrite an existing spiece.model")
    train.add_argument("--byte-fallback", action="store_true",
                       help="spell characters outside the vocabulary as UTF-8 byte pieces <0xNN>, not <unk>")
    train.add_argument("--keep-whitespace", action="store_true",
                       help="keep newlines, tabs and runs of spaces and skip NFKC (needs --byte-fallback: "
                       "together any text round-trips exactly)")


def run(args: argparse.Namespace) -> int:
    if args.keep_whitespace and not args.byte_fallback:
        raise UserError(KEEP_WHITESPACE_NEEDS_BYTES.format(keep="--keep-whitespace", bytes="--byte-fallback"))
    train_tokenizer(args.input, args.output_dir, args.vocab_size, args.threads, args.max_sentences, args.force,
                    args.byte_fallback, args.keep_whitespace)
    return 0
