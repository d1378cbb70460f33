"""The Hugging Face tokenizer an exported folder carries: HF's own ``T5Tokenizer`` where it encodes
as our SentencePiece model does, and a ``tokenizer.json`` built from the model where it cannot.

transformers 5.x's ``T5Tokenizer`` (the only T5 tokenizer class left: ``T5TokenizerFast`` is an alias,
the SentencePiece-backed slow class is gone) rebuilds its ``tokenizers`` pipeline in ``__init__``,
even from a folder's ``tokenizer.json``: a ``WhitespaceSplit`` pre-tokenizer and a Unigram model with
``byte_fallback=False``. That is T5's public vocabulary exactly (its NFKC folds newlines and tabs to
spaces and collapses runs of them, and it has no byte pieces), so those folders keep HF's files. A
model trained with ``--byte-fallback`` or ``--keep-whitespace`` would lose its newlines, tabs, double
spaces and every byte piece there (measured: ``<``, ``{``, Greek and CJK all ``<unk>``). For it we build
the pipeline from the model's own settings with transformers' ``SpmConverter.build_tokenizer_from_spm_proto``
(Unigram with byte fallback, SentencePiece's normalizer spec, the dummy prefix on every chunk between
sentinels as our encoder has it), add T5's sentinels, specials and EOS template, and save it as a
generic ``TokenizersBackend`` (``tokenizer_class: TokenizersBackend``), which ``AutoTokenizer`` loads
from ``tokenizer.json`` unchanged.

The ``tokenizers`` library's Unigram also matches byte pieces as text (the literal ``<0x41>`` would
encode as the byte piece, decoding to ``A``), where SentencePiece never does: a split just after a ``<``
that starts such a spelling stops it. That split only keeps SentencePiece's ids where no piece
crosses it, i.e. no piece holds a ``<`` before its last character; otherwise it is left out and such
a literal is the one text whose ids differ.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, pre_tokenizers, processors
from transformers import T5Tokenizer, TokenizersBackend
from transformers.convert_slow_tokenizer import SpmConverter

from spactor_mega.data.special_tokens import EOS_ID
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

_NORMAL_PIECE = 1  # sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
_BYTE_PIECE_SPELLING = Regex("<(?=0x[0-9A-F]{2}>)")  # the "<" of a literal "<0x41>"


def t5_tokenizer_reproduces(tokenizer: T5SentencePieceTokenizer) -> bool:
    """Whether HF's ``T5Tokenizer`` encodes as this model: no byte pieces, whitespace folded and collapsed."""
    spec = tokenizer.proto.normalizer_spec
    return not tokenizer.byte_fallback and spec.remove_extra_whitespaces and spec.name != "identity"


def hf_tokenizer(model_file: Path, extra_ids: int):
    """The HF tokenizer for the ``spiece.model`` at ``model_file`` with ``extra_ids`` sentinels appended
    (``<extra_id_0>`` the highest id, as HF's T5): ``save_pretrained`` it into the model's folder."""
    tokenizer = T5SentencePieceTokenizer(model_file)
    if t5_tokenizer_reproduces(tokenizer):
        return T5Tokenizer.from_pretrained(str(model_file.parent), extra_ids=extra_ids)
    proto = tokenizer.proto
    sentinels = [f"<extra_id_{k}>" for k in range(extra_ids)]
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(s, 0.0) for s in reversed(sentinels)]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer.byte_fallback and not any("<" in p.piece[:-1] for p in proto.pieces if p.type == _NORMAL_PIECE):
        split = pre_tokenizers.Split(_BYTE_PIECE_SPELLING, behavior="merged_with_previous")
        backend.pre_tokenizer = pre_tokenizers.Sequence([t for t in (backend.pre_tokenizer, split) if t is not None])
    specials = [proto.trainer_spec.pad_piece, proto.trainer_spec.eos_piece, proto.trainer_spec.unk_piece]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + sentinels])
    eos = proto.trainer_spec.eos_piece
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, EOS_ID)])
    return TokenizersBackend(
        tokenizer_object=backend, pad_token=specials[0], eos_token=eos, unk_token=specials[2],
        additional_special_tokens=sentinels, extra_ids=extra_ids,
        clean_up_tokenization_spaces=False,  # it would delete the space in " ." and "do n't"
    )
