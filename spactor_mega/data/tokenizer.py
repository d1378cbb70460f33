"""SentencePiece tokenizer with T5's conventions and sentinels, in every public T5 family's layout.

Ids follow Hugging Face's ``T5Tokenizer`` on the same folder exactly, so exported checkpoints
and public ``spiece.model`` files interoperate unchanged:

- SentencePiece pieces keep their ids: pad 0, EOS 1, unk 2, no BOS.
- ``sp_size`` is the number of ids below the sentinels (the word pieces): the data pipeline
  treats ids ``>= sp_size`` as sentinels or the mask and samples replacements below it.
- ``<extra_id_k>`` = ``sp_size + num_sentinels - 1 - k``: ``<extra_id_0>`` is the highest id.
  The sentinels live in one of two places:

  - appended above the pieces (T5, Flan-T5, UMT5): the model has none, the folder's
    ``tokenizer_config.json`` declares ``extra_ids`` N > 0 (HF appends them as added tokens;
    t5-base: 32,000 pieces, ``<extra_id_0>`` = 32,099; UMT5: 256,000 pieces plus its N), and a
    ``.model`` with no config beside it gets the default 100;
  - inside the ``.model`` as its top N pieces ``▁<extra_id_k>`` (or ``<extra_id_k>``), k = 0
    the last piece (mT5's ``mc4.250000.100extra``: 250,100 pieces, ``<extra_id_0>`` = 250,099,
    ``sp_size`` 250,000); its folder declares ``extra_ids`` 0. :attr:`sentinels_in_model`
    says which, and :attr:`hf_extra_ids` is the ``extra_ids`` to write back on export.

  Anything else (no sentinels anywhere, in-model ones not contiguous at the top, or both
  layouts at once) is refused in one line naming the file.
- One id above the sentinels, ``mask_id = sp_size + num_sentinels``, is SpacTor's MLM mask
  token: it is no word piece and no sentinel, and exported models carry it in the padded
  embedding rows that HF T5 already has (32,100 tokens in a 32,128-row embedding; mT5's
  250,100 in 250,112).

Training a new model (:func:`train_sentencepiece`) uses the unigram algorithm with T5's ids; with
``byte_fallback`` and ``keep_whitespace`` it keeps every text exactly (see the function).
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from spactor_mega.data.special_tokens import EOS_ID, PAD_ID, UNK_ID
from spactor_mega.errors import UserError

DEFAULT_NUM_SENTINELS = 100
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
_SENTINEL_AFTER_TEXT_RE = re.compile(r"(?<=\S)<extra_id_(\d+)>")
_SENTINEL_PIECE_RE = re.compile(r"\u2581?<extra_id_(\d+)>")  # how a sentinel is spelled inside a .model
MAX_SENTENCE_BYTES = 16384  # the longest training sentence; C4 paragraphs exceed SentencePiece's 4,192 default
# Kept text round-trips only if what the vocabulary lacks is spelled in bytes rather than lost to <unk>.
KEEP_WHITESPACE_NEEDS_BYTES = ("{keep} needs {bytes}: a tokenizer that keeps the text exactly must spell the "
                               "characters its vocabulary lacks in bytes, not map them to <unk>")


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


def _sentinels_from_hf_config(config: Path) -> Optional[int]:
    """The ``extra_ids`` an HF ``tokenizer_config.json`` declares, or None when there is none."""
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


def _sentinels_in_model(sp: spm.SentencePieceProcessor, model_file: Path) -> int:
    """How many ``<extra_id_k>`` pieces the model holds itself (mT5's layout), 0 when none;
    refuses them unless they are its top pieces counting down (``<extra_id_0>`` the last)."""
    size = sp.get_piece_size()
    found = {}  # id -> k
    for i, piece in enumerate(sp.id_to_piece(list(range(size)))):
        m = _SENTINEL_PIECE_RE.fullmatch(piece) if "<extra_id_" in piece else None
        if m:
            found[i] = int(m.group(1))
    for i, k in sorted(found.items()):
        if k != size - 1 - i or k >= len(found):
            raise TokenizerError(
                f"{model_file}: its sentinel pieces are not its top {len(found)} pieces counting down from "
                f"<extra_id_0> = id {size - 1} (<extra_id_{k}> is id {i}); span corruption needs <extra_id_k> "
                f"= {size - 1} - k: rebuild the model with them last, or remove them and declare extra_ids"
            )
    return len(found)


class T5SentencePieceTokenizer:
    """Encodes text to T5 ids and back; knows pad, EOS, sentinel and mask ids.

    ``path``: a ``.model`` file or a folder holding ``spiece.model``; the ``tokenizer_config.json``
    beside the model (if any) declares the appended sentinels, ``num_sentinels`` where none does."""

    def __init__(self, path: str | Path, num_sentinels: int = DEFAULT_NUM_SENTINELS):
        self.model_file = resolve_model_file(path)
        folder = self.model_file.parent
        config = folder / "tokenizer_config.json"
        declared = _sentinels_from_hf_config(config)
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
        inside = _sentinels_in_model(self.sp, self.model_file)
        if inside and declared:
            raise TokenizerError(
                f"{config}: declares extra_ids {declared} but {self.model_file.name} already holds {inside} "
                "sentinel pieces (HF would add a second set above them); set extra_ids to 0"
            )
        if not inside and declared is not None:
            num_sentinels = declared
        if not inside and num_sentinels <= 0:
            source = f"{config.name} declares none" if declared is not None else "none are asked for"
            raise TokenizerError(
                f"{folder}: tokenizer has no sentinel tokens (<extra_id_k>): {source} and "
                f"{self.model_file.name} holds none; span corruption needs them: use a T5 tokenizer with "
                "extra_ids=100 (or an mT5-style model holding them as its top pieces)"
            )
        # Sentinels inside the model (mT5) take its top ids; appended ones (T5, UMT5) follow them.
        self.sentinels_in_model = inside > 0
        self.num_sentinels = inside or num_sentinels
        self.sp_size = self.sp.get_piece_size() - inside
        self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID

    # What the model keeps of a text --------------------------------------------------------
    @cached_property
    def proto(self) -> sentencepiece_model_pb2.ModelProto:
        """The model's training and normalization settings (and pieces), as SentencePiece stores them."""
        return sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())

    @property
    def byte_fallback(self) -> bool:
        """Characters outside the vocabulary become their UTF-8 bytes (``<0xNN>`` pieces), not ``<unk>``."""
        return self.proto.trainer_spec.byte_fallback

    @property
    def keeps_whitespace(self) -> bool:
        """Newlines, tabs and runs of spaces survive encoding (no NFKC folding, no whitespace collapsing)."""
        spec = self.proto.normalizer_spec
        return spec.name == "identity" and not spec.remove_extra_whitespaces

    # Sizes and special ids -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Word pieces plus sentinels, as HF's ``len(T5Tokenizer)`` on the same folder."""
        return self.sp_size + self.num_sentinels

    @property
    def hf_extra_ids(self) -> int:
        """The ``extra_ids`` HF's ``T5Tokenizer`` needs to give these ids: 0 where the model holds the
        sentinels (HF would otherwise append a second set), their number where they are appended."""
        return 0 if self.sentinels_in_model else self.num_sentinels

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
        """Text to ids; ``<extra_id_k>`` in the text becomes its sentinel id wherever it stands. HF
        agrees for appended sentinels; for in-model ones HF matches the piece ``▁<extra_id_k>``
        only at the start or after a space, and spells ``x<extra_id_0>`` out in pieces."""
        if "<extra_id_" not in text:
            ids = self.sp.encode(text)
        elif self.sentinels_in_model:
            # The model's pieces are "▁<extra_id_k>": give each sentinel its word boundary and let
            # SentencePiece match them, so that text after one starts without a boundary, as in HF.
            ids = self.sp.encode(_SENTINEL_AFTER_TEXT_RE.sub(self._bounded, text))
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

    def _bounded(self, m: re.Match) -> str:
        return (" " if int(m.group(1)) < self.num_sentinels else "") + m.group(0)

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
    byte_fallback: bool = False,
    keep_whitespace: bool = False,
) -> Path:
    """Trains a unigram SentencePiece model with T5's ids; returns the ``.model`` path.

    T5's settings (the defaults) fold the text before encoding: NFKC, newlines and tabs to spaces,
    runs of spaces to one, and a character absent from the training text becomes ``<unk>``.
    ``byte_fallback`` adds 256 ``<0xNN>`` pieces that spell such a character in UTF-8 bytes;
    ``keep_whitespace`` encodes the text as it is (no normalization, whitespace kept, pieces of
    whitespace alone allowed, e.g. indentation). With both, ``decode(encode(x)) == x`` for any x
    without a literal ``<extra_id_k>`` (a sentinel) or U+2581 (SentencePiece's space mark)."""
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
        max_sentence_length=MAX_SENTENCE_BYTES,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
        normalization_rule_name="identity" if keep_whitespace else "nmt_nfkc",
        remove_extra_whitespaces=not keep_whitespace,
        allow_whitespace_only_pieces=keep_whitespace,
        byte_fallback=byte_fallback,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
