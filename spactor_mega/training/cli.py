"""``spactor train``: pretrain with SpacTor; ``--dry-run`` validates and prices a config."""

from __future__ import annotations

import argparse

from spactor_mega.config import add_config_arguments, config_from_args
from spactor_mega.plan.dry_run import describe
from spactor_mega.plan.hardware_cli import add_hardware_arguments, hardware_from_args
from spactor_mega.plan.validate import validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pretrain a T5 encoder-decoder (v1.1 by default; v1.0, mT5, UMT5 kinds: model.*) with SpacTor: span corruption plus replaced-token detection "
        "for steps < spactor.tau, span corruption only after. Launch one process per device with torchrun "
        "(or launch/*.sh); on one machine without a launcher it runs as a single process."
    )
    parser.epilog = (
        "examples:\n  spactor train --config configs/demo-cpu.yaml\n"
        "  torchrun --nproc-per-node 2 -m spactor_mega.cli train --config configs/demo-cpu.yaml "
        "--parallel.tensor_model_parallel_size 2\n"
        "  spactor train --config configs/t5-base.yaml --dry-run"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print sizes and FLOPs, exit")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to validate for")
    add_hardware_arguments(parser, "scale model (with --dry-run; the step time, MFU and memory fit rest on these)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        world = args.world_size or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        print(describe(validate(cfg, world), world_size=world, hardware=hardware_from_args(args, cfg)))
        return 0
    # The training stack (Megatron, DeepSpeed) is imported only to train: --help and --dry-run
    # stay instant. train() validates the config before any process group exists.
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    try:
        train(cfg)
    finally:
        destroy_parallel()
    return 0
