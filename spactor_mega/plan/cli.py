"""``spactor plan``: the best layouts of a config on N GPUs by the scale model (:mod:`spactor_mega.plan.planner`)."""

from __future__ import annotations

import argparse

from spactor_mega.config import ConfigError, add_config_arguments, config_from_args
from spactor_mega.plan.hardware_cli import add_hardware_arguments, hardware_from_args
from spactor_mega.plan.planner import SEARCHED, describe_plan, plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Search TP, PP (balanced stages), virtual stages, micro-batch size, recompute, sequence parallelism and the "
        "distributed optimizer for N GPUs with the scale model of `spactor train --dry-run`; print the layouts whose "
        "predicted memory fits, fastest first, each with the `spactor train` line that runs it. A searched field "
        "given as a flag (e.g. --parallel.tensor_model_parallel_size 2) is held at that value."
    )
    parser.epilog = "example:\n  spactor plan --config configs/t5-xl.yaml --gpus 64 --gpu H100"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--gpus", type=int, required=True, help="the world size to plan for")
    parser.add_argument("--top", type=int, default=5, help="how many layouts to print (default 5)")
    add_hardware_arguments(parser, "hardware (the step time, MFU and memory fit rest on these)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1 or args.top < 1:
        raise ConfigError(f"--gpus and --top must be >= 1, got {args.gpus} and {args.top}")
    cfg = config_from_args(args)
    hw = hardware_from_args(args, cfg)
    flags = [(dest[4:], raw) for dest, raw in vars(args).items() if dest.startswith("cfg:")]
    pinned = frozenset(name for name, _ in flags if name in SEARCHED)
    result = plan(cfg, args.gpus, hw, pinned)
    print("\n".join(describe_plan(result, cfg, args.gpus, hw, args.top, args.config, flags)))
    return 0
