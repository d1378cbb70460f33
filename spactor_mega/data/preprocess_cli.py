"""The command line of :func:`spactor_mega.data.preprocess.preprocess`: ``spactor preprocess``, ``tools/preprocess.py``.

``add_arguments`` and ``run`` are the ``spactor`` subcommand interface; :func:`main` is the script's.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Optional, Sequence

from spactor_mega.data.preprocess import preprocess
from spactor_mega.errors import UserError

DESCRIPTION = """\
Tokenize C4-format text into one Megatron indexed dataset (<prefix>.bin/.idx) for SpacTor
pretraining. Inputs are JSON Lines files (.json, .jsonl, .json.gz, .jsonl.gz: one document
per line, its text under --json-keys), globs of them, or folders (of such shards, of
.parquet/.arrow shards, or written by datasets' save_to_disk). Each document is encoded with
the SentencePiece model of --tokenizer and ends with EOS (--no-append-eod leaves it out).
Bad lines (bad JSON, a missing or non-string key, non-UTF-8 bytes, empty text) are skipped
and reported with file:line at the end; a truncated .gz is an error. The output is the same
for any --workers and appears only when complete; an existing one needs --force."""

EPILOG = """\
example:
  python tools/preprocess.py --input 'data/demo_c4/c4-train.*.json.gz' \\
      --output-prefix data/demo_c4_train --tokenizer tokenizer/spiece.model --workers 4"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the preprocessing flags (Megatron's names where they overlap) to ``parser``."""
    if parser.description is None:
        parser.description = DESCRIPTION
    if parser.epilog is None:
        parser.epilog = EPILOG
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="files, globs (quote them; ** recurses) or folders")
    group.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                       help="key(s) holding the text (default: text); several are joined "
                            "with a newline into one document")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                       metavar="PATH", help="SentencePiece .model file, or a folder with spiece.model")
    group.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                       help="end each document with EOS (default: on; T5 chunks need the "
                            "document boundary)")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, metavar="PREFIX",
                       help="writes PREFIX.bin and PREFIX.idx (folders are created)")
    group.add_argument("--force", action="store_true", help="overwrite an existing output")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="tokenizer processes (default: 1); use about one per core")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar (it is off anyway when stderr is not a terminal)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs :func:`~spactor_mega.data.preprocess.preprocess` for parsed arguments; prints a summary or a
    one-line error.

    Returns the exit status: 0, 1 for an error, 130 when interrupted.
    """
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 1
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm)  # clean up temp files on kill too
    try:
        result = preprocess(
            args.input, args.output_prefix, args.tokenizer, workers=args.workers,
            json_keys=args.json_keys, append_eod=args.append_eod, force=args.force,
            progress=args.progress,
        )
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; no output written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(result.summary(), file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="preprocess", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
