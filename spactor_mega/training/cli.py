"""``spactor train``: pretrain with SpacTor; ``--dry-run`` validates and prices a config."""

from __future__ import annotations

import argparse

from spactor_mega.config import add_config_arguments, config_from_args
from spactor_mega.plan.dry_run import describe
from spactor_mega.plan.scale import Hardware, hardware
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
    scale = parser.add_argument_group("scale model (with --dry-run; the step time and MFU rest on these)")
    scale.add_argument("--gpu", default="H100", help="A100, H100, H100 PCIe or H200 (dense peak from plan/mfu.py; "
                       "train.peak_tflops overrides it); default H100")
    scale.add_argument("--efficiency", type=float, default=Hardware.efficiency,
                       help=f"fraction of the peak the model's FLOPs reach (default {Hardware.efficiency})")
    scale.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node,
                       help=f"default {Hardware.gpus_per_node}")
    scale.add_argument("--nvlink-gbs", type=float, default=Hardware.nvlink_gbs,
                       help=f"GB/s each GPU sends within a node (default {Hardware.nvlink_gbs:g}, H100 NVLink 4)")
    scale.add_argument("--network-gbs", type=float, default=Hardware.network_gbs,
                       help=f"GB/s each node sends to the others (default {Hardware.network_gbs:g}: 8 x 400 Gb/s)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        world = args.world_size or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        hw = hardware(args.gpu, cfg.train.precision != "fp32", cfg.train.peak_tflops, efficiency=args.efficiency,
                      gpus_per_node=args.gpus_per_node, nvlink_gbs=args.nvlink_gbs, network_gbs=args.network_gbs)
        print(describe(validate(cfg, world), world_size=world, hardware=hw))
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
