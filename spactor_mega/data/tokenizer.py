"""SentencePiece tokenizer with T5's conventions and sentinels.

Ids follow Hugging Face's ``T5Tokenizer(extra_ids=100)`` exactly, so exported checkpoints
and public T5 ``spiece.model`` files interoperate unchanged:

- SentencePiece pieces keep their ids: pad 0, EOS 1, unk 2, no BOS.
- ``<extra_id_k>`` = ``sp_size + num_sentinels - 1 - k``: ``<extra_id_0>`` is the highest id.
- One id above the sentinels, ``mask_id = sp_size + num_sentinels``, is SpacTor's MLM mask
  token: it is no word piece and no sentinel, and exported models carry it in the padded
  embedding rows that HF T5 already has (32,100 tokens in a 32,128-row embedding).

Training a new model (:func:`train_sentencepiece`) uses the unigram algorithm with T5's ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from spactor_mega.data.special_tokens import EOS_ID, PAD_ID, UNK_ID
from spactor_mega.errors import UserError

DEFAULT_NUM_SENTINELS = 100
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


class TokenizerError(UserError):
    """A tokenizer file that cannot serve T5 pretraining; the message names the file."""


def resolve_model_file(path: str | Path) -> Path:
    """Accepts a ``.model`` file or a folder holding ``spiece.model`` (an HF T5 folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "spiece.model"
    if not path.is_file():
        raise TokenizerError(
            f"{path}: SentencePiece model not found; train one with `spactor tokenizer train` "
            "or point data.tokenizer at a T5 spiece.model"
        )
    return path


def _sentinels_from_hf_config(folder: Path) -> Optional[int]:
    """The ``extra_ids`` an HF tokenizer folder declares, or None when it has no config."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{config}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if "extra_ids" in data:
        return int(data["extra_ids"])
    specials = data.get("additional_special_tokens") or data.get("extra_special_tokens") or []
    return sum(1 for t in specials if _SENTINEL_RE.fullmatch(str(t)))


class T5SentencePieceTokenizer:
    """Encodes text to T5 ids and back; knows pad, EOS, sentinel and mask ids."""

    def __init__(self, path: str | Path, num_sentinels: int = DEFAULT_NUM_SENTINELS):
        self.model_file = resolve_model_file(path)
        folder = Path(path) if Path(path).is_dir() else None
        declared = _sentinels_from_hf_config(folder) if folder else None
        if declared is not None:
            num_sentinels = declared
        if num_sentinels <= 0:
            raise TokenizerError(
                f"{folder or self.model_file}: tokenizer has no sentinel tokens (<extra_id_k>); "
                "span corruption needs them: use a T5 tokenizer with extra_ids=100"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.model_file}: not a SentencePiece model ({e})") from None
        ids = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise TokenizerError(
                f"{self.model_file}: pad/eos/unk ids are {ids}, T5 needs (0, 1, 2); "
                "retrain with `spactor tokenizer train`"
            )
        self.sp_size = self.sp.get_piece_size()
        self.num_sentinels = num_sentinels
        self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID

    # Sizes and special ids -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Pieces plus sentinels, as HF's ``len(T5Tokenizer)``."""
        return self.sp_size + self.num_sentinels

    @property
    def mask_id(self) -> int:
        return self.sp_size + self.num_sentinels

    @property
    def model_vocab_size(self) -> int:
        """Rows the embedding needs before padding: pieces, sentinels and the mask token."""
        return self.mask_id + 1

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise IndexError(f"sentinel {k} out of range 0..{self.num_sentinels - 1}")
        return self.sp_size + self.num_sentinels - 1 - k

    @property
    def first_sentinel_id(self) -> int:
        """``<extra_id_0>``; sentinel k is this minus k."""
        return self.sentinel_id(0)

    # Encoding --------------------------------------------------------------------------
    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Text to ids; ``<extra_id_k>`` in the text becomes its sentinel id as in HF."""
        if "<extra_id_" not in text:
            ids = self.sp.encode(text)
        else:
            ids = []
            pos = 0
            for m in _SENTINEL_RE.finditer(text):
                k = int(m.group(1))
                if k >= self.num_sentinels:
                    continue
                ids.extend(self.sp.encode(text[pos : m.start()]))
                ids.append(self.sentinel_id(k))
                pos = m.end()
            ids.extend(self.sp.encode(text[pos:]))
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; sentinels as ``<extra_id_k>``, the mask as ``<mask>``, pad/EOS dropped."""
        pieces: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                # SentencePiece drops a run's leading word boundary; keep it after a sentinel.
                space = " " if pieces and self.sp.id_to_piece(run[0]).startswith("\u2581") else ""
                pieces.append(space + self.sp.decode(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i >= self.sp_size:
                flush()
                k = self.sp_size + self.num_sentinels - 1 - i
                pieces.append(f"<extra_id_{k}>" if 0 <= k < self.num_sentinels else "<mask>")
            elif i not in (PAD_ID, EOS_ID):
                run.append(i)
        flush()
        return "".join(pieces)


def train_sentencepiece(
    sentences: Iterator[str],
    model_prefix: str | Path,
    vocab_size: int = 32000,
    character_coverage: float = 0.9999,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 2,
    seed_sentencepiece_size: int = 1_000_000,
) -> Path:
    """Trains a unigram SentencePiece model with T5's ids; returns the ``.model`` path."""
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=str(model_prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        max_sentence_length=16384,  # C4 paragraphs exceed the 4,192-byte default
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
