"""The ``spactor`` command: one entry point, a subcommand per stage of the data flow.

Subcommand modules are imported only when chosen, so ``spactor --help`` is instant and a
data-only command never pays for importing the model stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spactor_mega.errors import UserError
from spactor_mega.quiet import filter_known_warnings

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "tokenizer": ("spactor_mega.data.train_tokenizer", "train a SentencePiece tokenizer with T5's conventions"),
    "preprocess": ("spactor_mega.data.preprocess_cli", "C4 json/json.gz/jsonl -> Megatron indexed dataset"),
    "prepare": ("spactor_mega.prepare_cli", "build the tokenizer and datasets a config needs, show a batch"),
    "train": ("spactor_mega.training.cli", "pretrain a T5 with SpacTor (Megatron-Core or DeepSpeed engine)"),
    "convert": ("spactor_mega.convert.cli", "convert checkpoints to and from Hugging Face T5"),
    "plan": ("spactor_mega.plan.cli", "the fastest layouts (TP, PP, micro-batch, recompute, ...) that fit N GPUs"),
    "study": ("spactor_mega.study.cli", "SC only vs SpacTor(tau) vs SpacTor(inf) over seeds: table and plots"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``spactor`` parser, with the flags of subcommand ``command`` (the others' flags are not
    imported: see the module docstring). The docs' tests parse every documented command with it."""
    parser = argparse.ArgumentParser(
        prog="spactor",
        description="SpacTor pretraining of T5 encoder-decoders on Megatron-Core and DeepSpeed.",
        epilog="Run `spactor COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    filter_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        _print_error(args.command, e)
        return 2
    except KeyboardInterrupt:
        print(f"spactor {args.command}: interrupted", file=sys.stderr)
        return 130


def _print_error(command: str, error: UserError) -> None:
    """One line, once: under a launcher (``RANK`` set) an error every rank raises alike is rank 0's
    to print, and one that may be a single rank's is printed by every rank that has it, naming it."""
    rank = os.environ.get("RANK")
    if rank is None or error.same_on_every_rank:
        if rank in (None, "0"):
            print(f"spactor {command}: error: {error}", file=sys.stderr)
        return
    print(f"spactor {command}: error: [rank {rank}] {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
