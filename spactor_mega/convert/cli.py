"""``spactor convert``: ``to-hf`` (a checkpoint -> HF T5-family folder) and ``from-hf`` (HF T5, mT5, UMT5 -> checkpoint)."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  spactor convert to-hf runs/demo/checkpoints t5-demo-hf\n"
        "  spactor convert to-hf runs/demo/checkpoints/iter_0000200 t5-demo-hf --dtype bf16 --with-rtd-head\n"
        "  spactor convert from-hf t5-v1_1-base runs/t5b/checkpoints --tp 2 --pp 1\n"
        "  spactor convert from-hf mt5-base runs/mt5-base/checkpoints   # then: spactor train --config configs/continue-mt5.yaml"
    )
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_hf = sub.add_parser(
        "to-hf", help="a checkpoint (any TP/PP/DP layout, Megatron or DeepSpeed) -> HF T5/MT5/UMT5ForConditionalGeneration",
        description="Writes a folder that the model's class (model.hf_model_type) and AutoTokenizer.from_pretrained "
                    "load: config.json, safetensors weights, generation_config.json, spiece.model and tokenizer files, "
                    "and README.md, the model card (metadata for the Hub, the architecture, the run's objective, "
                    "tau, steps, tokens, data and final validation). The generator G is dropped.",
    )
    to_hf.add_argument("checkpoint", help="a checkpoint directory (iter_NNNNNNN) or a save dir (its latest)")
    to_hf.add_argument("out", help="output folder (must not exist unless --force)")
    to_hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (default fp32)")
    to_hf.add_argument("--with-rtd-head", action="store_true",
                       help="also write the RTD head as rtd_head.safetensors (checkpoints before tau)")
    to_hf.add_argument("--max-shard-size", default="2GB", help="safetensors shard limit (default 2GB)")
    to_hf.add_argument("--force", action="store_true", help="replace an existing output folder")

    from_hf = sub.add_parser(
        "from-hf", help="an HF T5 (v1.0, v1.1, Flan-T5, gated-SiLU), mT5 or UMT5 model -> a checkpoint to continue "
                        "pretraining with SpacTor",
        description="Writes a training save dir (iter_0000000/, latest, config.yaml) holding D's weights; training "
                    "from it (--train.resume SAVE_DIR) starts G, the RTD head, the optimizers and the step afresh.",
    )
    from_hf.add_argument("hf_dir", help="HF model folder: config.json, weights, spiece.model, tokenizer_config.json")
    from_hf.add_argument("checkpoint", help="output save dir (must not exist unless --force)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train with (vocab padding)")
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train with (recorded)")
    from_hf.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # Imported here, not at module top: `spactor convert --help` answers without torch and transformers.
    if args.direction == "to-hf":
        from spactor_mega.convert.hf_export import export_to_hf

        out = export_to_hf(args.checkpoint, args.out, dtype=args.dtype, with_rtd_head=args.with_rtd_head,
                           force=args.force, max_shard_size=args.max_shard_size)
        print(f"[convert] wrote {out} in {time.perf_counter() - start:.1f} s: "
              f"T5ForConditionalGeneration.from_pretrained({str(out)!r})")
        return 0
    from spactor_mega.convert.hf_import import import_from_hf

    out = import_from_hf(args.hf_dir, args.checkpoint, tp=args.tp, pp=args.pp, force=args.force)
    print(f"[convert] wrote {out} in {time.perf_counter() - start:.1f} s; continue pretraining with "
          f"spactor train --config {out / 'config.yaml'} --train.resume {out} --data.train_data ...")
    return 0
