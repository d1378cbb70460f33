"""``spactor prepare``: make sure a config's tokenizer and indexed datasets exist, then show a batch.

A config may name raw C4 files (``data.train_corpus`` / ``data.valid_corpus``) beside the
tokenizer and dataset prefixes it trains on; whatever of those is missing is built from them,
so a fresh checkout goes from the embedded corpus to training with one command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spactor_mega.config import Config, add_config_arguments, config_from_args, validate
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer, resolve_model_file
from spactor_mega.errors import UserError


def _say(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


def ensure_tokenizer(cfg: Config) -> T5SentencePieceTokenizer:
    data = cfg.data
    if not data.tokenizer:
        raise UserError("data.tokenizer is empty; give a spiece.model (or a folder holding one)")
    path = Path(data.tokenizer)
    model_file = path / "spiece.model" if path.suffix != ".model" else path
    if not model_file.exists():
        if not data.train_corpus:
            resolve_model_file(path)  # raises the not-found error with its advice
        from spactor_mega.data.train_tokenizer import train_tokenizer

        _say(f"training tokenizer {model_file} (vocab {data.tokenizer_vocab_size}) from {data.train_corpus}")
        train_tokenizer(data.train_corpus, model_file.parent, data.tokenizer_vocab_size)
    return T5SentencePieceTokenizer(path)


def _ensure_dataset(prefixes: list, corpus: list, tokenizer: T5SentencePieceTokenizer, workers: int, name: str) -> None:
    if len(prefixes) != 1 or not corpus:
        return  # blends and prebuilt datasets are the user's to build
    prefix = str(prefixes[0])
    if Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists():
        return
    from spactor_mega.data.preprocess import preprocess

    _say(f"building {name} dataset {prefix}.bin/.idx from {corpus}")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    preprocess(corpus, prefix, str(tokenizer.model_file), workers=workers)


def ensure_data(cfg: Config) -> T5SentencePieceTokenizer:
    """Builds what is missing of the tokenizer and datasets; returns the tokenizer."""
    tokenizer = ensure_tokenizer(cfg)
    _ensure_dataset(cfg.data.train_data, cfg.data.train_corpus, tokenizer, cfg.data.preprocess_workers, "train")
    _ensure_dataset(cfg.data.valid_data, cfg.data.valid_corpus, tokenizer, cfg.data.preprocess_workers, "validation")
    return tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example: spactor prepare --config configs/demo-cpu.yaml"
    parser.add_argument("--show", type=int, default=1, help="decoded example batches rows to print")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = validate(config_from_args(args))
    tokenizer = ensure_data(cfg)
    from spactor_mega.data.dataset import SpactorBatchBuilder, build_datasets, collate_raw
    from spactor_mega.data.span_corruption import SpanCorruption

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
    _say(
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
