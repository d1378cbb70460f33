"""The scale model's hardware flags (:class:`~spactor_mega.plan.scale.Hardware`), shared by
``spactor train --dry-run`` and ``spactor plan``."""

from __future__ import annotations

import argparse

from spactor_mega.config import Config, ConfigError
from spactor_mega.plan.scale import Hardware, hardware


def add_hardware_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    group = parser.add_argument_group(title)
    group.add_argument("--gpu", default="H100", help="A100, H100, H100 PCIe or H200 (dense peak from plan/mfu.py, "
                       "train.peak_tflops overrides it; memory from plan/scale.py); default H100")
    group.add_argument("--efficiency", type=float, default=Hardware.efficiency,
                       help=f"fraction of the peak the model's FLOPs reach (default {Hardware.efficiency})")
    group.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node,
                       help=f"default {Hardware.gpus_per_node}")
    group.add_argument("--nvlink-gbs", type=float, default=Hardware.nvlink_gbs,
                       help=f"GB/s each GPU sends within a node (default {Hardware.nvlink_gbs:g}, H100 NVLink 4)")
    group.add_argument("--network-gbs", type=float, default=Hardware.network_gbs,
                       help=f"GB/s each node sends to the others (default {Hardware.network_gbs:g}: 8 x 400 Gb/s)")
    group.add_argument("--gpu-memory-gib", type=float, default=None,
                       help="GiB of memory per GPU (default: the --gpu's, e.g. 79.6 for an H100 80GB)")
    group.add_argument("--memory-headroom", type=float, default=Hardware.memory_headroom,
                       help="fraction of the GPU's memory kept free for what the estimate does not count (LM-head "
                       f"logits, communication buffers, the CUDA context; default {Hardware.memory_headroom:g})")


def hardware_from_args(args: argparse.Namespace, cfg: Config) -> Hardware:
    """The flags' :class:`Hardware`; a value that means nothing is refused in one line naming its flag."""
    for flag, value, ok, meaning in (
            ("--efficiency", args.efficiency, 0 < args.efficiency <= 1, "in (0, 1]"),
            ("--gpus-per-node", args.gpus_per_node, args.gpus_per_node >= 1, ">= 1"),
            ("--nvlink-gbs", args.nvlink_gbs, args.nvlink_gbs > 0, "positive"),
            ("--network-gbs", args.network_gbs, args.network_gbs > 0, "positive"),
            ("--gpu-memory-gib", args.gpu_memory_gib, args.gpu_memory_gib is None or args.gpu_memory_gib > 0, "positive"),
            ("--memory-headroom", args.memory_headroom, 0 <= args.memory_headroom < 1, "in [0, 1)")):
        if not ok:
            raise ConfigError(f"{flag} must be {meaning}, got {value:g}")
    return hardware(args.gpu, cfg.train.precision != "fp32", cfg.train.peak_tflops, memory_gib=args.gpu_memory_gib,
                    efficiency=args.efficiency, gpus_per_node=args.gpus_per_node, nvlink_gbs=args.nvlink_gbs,
                    network_gbs=args.network_gbs, memory_headroom=args.memory_headroom)
