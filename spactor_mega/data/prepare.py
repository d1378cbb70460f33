"""``spactor prepare``: make sure a config's tokenizer and indexed datasets exist, then show a batch.

A config may name raw C4 files (``data.train_corpus`` / ``data.valid_corpus``) beside the
tokenizer and dataset prefixes it trains on; whatever of those is missing is built from them,
so a fresh checkout goes from the embedded corpus to training with one command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spactor_mega.config import Config
from spactor_mega.data.preprocess import preprocess
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer, resolve_model_file
from spactor_mega.data.train_tokenizer import train_tokenizer
from spactor_mega.errors import UserError


def say(message: str) -> None:
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
        say(f"training tokenizer {model_file} (vocab {data.tokenizer_vocab_size}) from {data.train_corpus}")
        train_tokenizer(data.train_corpus, model_file.parent, data.tokenizer_vocab_size,
                        byte_fallback=data.tokenizer_byte_fallback, keep_whitespace=data.tokenizer_keep_whitespace)
    tokenizer = T5SentencePieceTokenizer(path)
    # A tokenizer already there is used as it is: refuse one that does not keep what the config asks to keep.
    for field, wanted, has in (("tokenizer_byte_fallback", data.tokenizer_byte_fallback, tokenizer.byte_fallback),
                               ("tokenizer_keep_whitespace", data.tokenizer_keep_whitespace, tokenizer.keeps_whitespace)):
        if wanted and not has:
            raise UserError(f"data.{field} is true but {tokenizer.model_file} was trained without it; delete it to "
                            "retrain it from data.train_corpus, or set the field false")
    return tokenizer


def _ensure_dataset(prefixes: list, corpus: list, tokenizer: T5SentencePieceTokenizer, workers: int, name: str) -> None:
    if len(prefixes) != 1 or not corpus:
        return  # blends and prebuilt datasets are the user's to build
    prefix = str(prefixes[0])
    if Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists():
        return
    say(f"building {name} dataset {prefix}.bin/.idx from {corpus}")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    preprocess(corpus, prefix, str(tokenizer.model_file), workers=workers)


def ensure_data(cfg: Config) -> T5SentencePieceTokenizer:
    """Builds what is missing of the tokenizer and datasets; returns the tokenizer."""
    tokenizer = ensure_tokenizer(cfg)
    _ensure_dataset(cfg.data.train_data, cfg.data.train_corpus, tokenizer, cfg.data.preprocess_workers, "train")
    _ensure_dataset(cfg.data.valid_data, cfg.data.valid_corpus, tokenizer, cfg.data.preprocess_workers, "validation")
    return tokenizer
