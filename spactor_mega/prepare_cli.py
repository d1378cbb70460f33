"""``spactor prepare``: build what a config's data needs (tokenizer, indexed datasets) from its raw
files, and print a decoded SC/MLM example batch."""

from __future__ import annotations

import argparse

from spactor_mega.config import add_config_arguments, config_from_args
from spactor_mega.data.prepare import ensure_data, say
from spactor_mega.data.span_corruption import SpanCorruption
from spactor_mega.plan.validate import validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example: spactor prepare --config configs/demo-cpu.yaml"
    parser.add_argument("--show", type=int, default=1, help="decoded example batches rows to print")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = validate(config_from_args(args))
    tokenizer = ensure_data(cfg)
    # Imported only now: it loads torch and Megatron (~5 s), which `--help` and ensure_data do not
    # need, and ensure_data may fork preprocessing workers, which is several times slower after.
    from spactor_mega.data.dataset import (
        SpactorBatchBuilder,
        build_datasets,
        collate_raw,
    )

    corruption = SpanCorruption(
        cfg.data.encoder_seq_length, tokenizer.first_sentinel_id, tokenizer.num_sentinels,
        cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length,
    )
    train, valid = build_datasets(
        cfg.data.train_data, cfg.data.valid_data, cfg.data.split, corruption, cfg.train.seed,
        cfg.train.steps * cfg.train.global_batch_size, cfg.train.eval_batches * cfg.train.global_batch_size,
        cfg.data.cache_dir,
    )
    builder = SpactorBatchBuilder(corruption, tokenizer.sp_size, cfg.spactor.mlm_fraction)
    raw = collate_raw([train[i] for i in range(max(args.show, 1))])
    batch = builder(raw["raw"], raw["key"], with_mlm=True)
    say(
        f"train: {len(train)} samples of {corruption.raw_length} raw tokens -> {corruption.encoder_length} inputs "
        f"+ {corruption.decoder_length} targets; validation: {len(valid) if valid is not None else 0} samples; "
        f"MLM masks {int(batch['mlm_weights'][0].sum())} tokens per example"
    )
    for row in range(args.show):
        masked = batch["enc_tokens"][row].clone()
        masked[batch["mlm_positions"][row][batch["mlm_weights"][row] > 0]] = tokenizer.mask_id
        print(f"--- example {row}\ninputs : {tokenizer.decode(batch['enc_tokens'][row])}")
        print(f"targets: {tokenizer.decode(batch['labels'][row])}")
        print(f"G input: {tokenizer.decode(masked)}")
    return 0
