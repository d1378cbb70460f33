"""Small Hugging Face model folders of each public T5 family, as a hub download holds them.

The families' checkpoints cannot be downloaded here, so tests build them the way HF's own tests
do: the family's config class at a small size, random weights, ``save_pretrained``, and a
SentencePiece model with the family's sentinel layout (:data:`FAMILIES`).

``config.json`` is written as the hub's files state it (``tie_word_embeddings`` false for the
untied families, no ``scale_decoder_outputs``), or as transformers 5.x's ``save_pretrained``
leaves it (``config_style="transformers"``): 5.x forces ``tie_word_embeddings: true`` into every
T5-family config; ``T5Config``/``UMT5Config`` keep the old flag as ``scale_decoder_outputs``
(v1.0's ``d_model ** -0.5`` rescale of the decoder output), ``MT5Config`` keeps nothing (MT5
never rescales), and an untied head is then told only by a distinct ``lm_head.weight`` tensor.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import transformers
from sentencepiece import sentencepiece_model_pb2

from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.model.hf_mapping import untie_lm_head


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that loads it
    config_class: str
    feed_forward_proj: str
    tied: bool  # lm_head is shared.weight and the decoder output is rescaled by d_model ** -0.5
    bias_per_layer: bool  # a relative-attention bias table in every self-attention layer (UMT5), not only block 0
    sentinels: str  # "appended" (tokenizer_config's extra_ids) or "in-model" (the .model's top pieces, as mT5)
    extra_ids: int  # tokenizer_config.json's extra_ids: 0 for in-model sentinels


# t5-v1_1 stands for Flan-T5 too (the same architecture and files); gated-silu for UL2-style models.
FAMILIES = {
    f.name: f
    for f in (
        Family("t5-v1_0", "t5", "T5ForConditionalGeneration", "T5Config", "relu", True, False, "appended", 100),
        Family("t5-v1_1", "t5", "T5ForConditionalGeneration", "T5Config", "gated-gelu", False, False, "appended", 100),
        Family("mt5", "mt5", "MT5ForConditionalGeneration", "MT5Config", "gated-gelu", False, False, "in-model", 0),
        Family("umt5", "umt5", "UMT5ForConditionalGeneration", "UMT5Config", "gated-gelu", False, True, "appended", 300),
        Family("gated-silu", "t5", "T5ForConditionalGeneration", "T5Config", "gated-silu", False, False, "appended", 100),
    )
}

SHAPE = dict(
    d_model=32, d_kv=8, num_heads=2, d_ff=48, num_layers=3, num_decoder_layers=2,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
MT5_SENTINELS = 100  # mT5's mc4.250000.100extra


def hf_class(family: str) -> type:
    return getattr(transformers, FAMILIES[family].hf_class)


def append_pieces(model_file: Path, out: Path, pieces: Sequence[str]) -> Path:
    """``model_file`` with ``pieces`` added after its last piece, written to ``out``.

    They are USER_DEFINED pieces of score 0, the way T5's seqio built mT5's ``spiece.model``
    (``▁<extra_id_99>`` ... ``▁<extra_id_0>``): SentencePiece matches one only where its exact text
    stands, so text without it tokenizes as before."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(Path(model_file).read_bytes())
    for piece in pieces:
        proto.pieces.add(piece=piece, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    out = Path(out)
    out.write_bytes(proto.SerializeToString())
    return out


def mt5_sentinel_pieces(n: int = MT5_SENTINELS) -> list[str]:
    """mT5's sentinel pieces in model order: ``<extra_id_0>`` last, so it gets the highest id."""
    return [f"\u2581<extra_id_{k}>" for k in reversed(range(n))]


def write_tokenizer(family: str, folder: Path, spm_source: Path) -> T5SentencePieceTokenizer:
    """The family's ``spiece.model`` and the files HF's ``T5Tokenizer`` saves, in ``folder``."""
    fam = FAMILIES[family]
    model_file = folder / "spiece.model"
    if fam.sentinels == "in-model":
        append_pieces(spm_source, model_file, mt5_sentinel_pieces())
    else:
        shutil.copy(spm_source, model_file)
    transformers.T5Tokenizer.from_pretrained(str(folder), extra_ids=fam.extra_ids).save_pretrained(str(folder))
    return T5SentencePieceTokenizer(folder)


def vocab_rows(tokenizer: T5SentencePieceTokenizer) -> int:
    """Pieces, sentinels and the mask id, rounded up to a multiple of 8 (as HF's 32128 > 32101)."""
    return 8 * math.ceil(tokenizer.model_vocab_size / 8)


def hf_config(family: str, vocab_size: int):
    fam = FAMILIES[family]
    return getattr(transformers, fam.config_class)(
        vocab_size=vocab_size, feed_forward_proj=fam.feed_forward_proj, tie_word_embeddings=fam.tied,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SHAPE,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn from ``seed`` (not HF's init, which may change between versions):
    RMSNorm weights uniform(0.5, 1.5), others normal with std fan_in ** -0.5 (embedding: 1, an
    untied head 0.5), so that a swapped or missing tensor changes the model's outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is shared.weight, listed once
            if "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def build_hf_family(family: str, folder: Path, spm_source: Path, seed: int = 0, config_style: str = "hub") -> Path:
    """Writes ``folder`` (created) as a hub download of ``family`` holds it: ``config.json``,
    ``model.safetensors``, ``generation_config.json``, ``spiece.model`` and tokenizer files; the
    model has random weights from ``seed`` and as many rows as :func:`vocab_rows`. ``config_style``:
    "hub" (the flags the hub's config.json files state) or "transformers" (as 5.x saves it)."""
    if config_style not in ("hub", "transformers"):
        raise ValueError(f"config_style must be 'hub' or 'transformers', got {config_style!r}")
    fam = FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(family, folder, spm_source)
    model = hf_class(family)(hf_config(family, vocab_rows(tokenizer)))
    if not fam.tied:
        untie_lm_head(model)  # transformers 5.x ties every T5-family head at construction
    randomize(model, seed)
    model.save_pretrained(folder)
    if config_style == "hub":
        config_file = folder / "config.json"
        doc = json.loads(config_file.read_text())
        doc["tie_word_embeddings"] = fam.tied
        doc.pop("scale_decoder_outputs", None)  # a 5.x attribute derived from the flag above on load
        config_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder
