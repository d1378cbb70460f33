"""Our T5 tokenizer wrapper gives Hugging Face's ids, sentinels included; bad files are named."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from spactor_mega.data.tokenizer import T5SentencePieceTokenizer, TokenizerError
from spactor_mega.data.train_tokenizer import train_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo_c4"


def demo_texts(limit=None):
    texts = []
    for path in sorted(DEMO.glob("c4-validation.*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts[:limit]


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(DEMO / "c4-validation.*.json.gz")], out, vocab_size=2000)
    return out


def test_ids_match_hugging_face_t5_tokenizer_on_the_demo_corpus(demo_tokenizer_dir):
    from transformers import T5Tokenizer

    hf = T5Tokenizer.from_pretrained(str(demo_tokenizer_dir))
    ours = T5SentencePieceTokenizer(demo_tokenizer_dir / "spiece.model")
    assert len(hf) == ours.vocab_size
    assert hf.convert_tokens_to_ids("<extra_id_0>") == ours.sentinel_id(0) == ours.vocab_size - 1
    assert hf.convert_tokens_to_ids("<extra_id_99>") == ours.sentinel_id(99) == ours.sp_size
    texts = demo_texts()
    assert len(texts) > 20
    # Sentinels inside the text too, where span corruption would put them.
    with_sentinels = [
        " ".join(f"{w} <extra_id_{i % 100}>" if i % 7 == 3 else w for i, w in enumerate(t.split()[:300]))
        for t in texts[:50]
    ]
    for text in texts + with_sentinels:
        assert ours.encode(text, add_eos=True) == hf(text)["input_ids"]


def test_it_loads_an_hf_t5_folder_unchanged(demo_tokenizer_dir, tmp_path):
    from transformers import T5Tokenizer

    # A hub-style T5 folder: spiece.model beside the tokenizer config HF writes.
    T5Tokenizer.from_pretrained(str(demo_tokenizer_dir)).save_pretrained(tmp_path)
    shutil.copy(demo_tokenizer_dir / "spiece.model", tmp_path / "spiece.model")
    ours = T5SentencePieceTokenizer(tmp_path)
    assert ours.num_sentinels == 100
    assert ours.mask_id == ours.vocab_size == ours.sp_size + 100


def test_a_tokenizer_without_sentinels_is_rejected(demo_tokenizer_dir, tmp_path):
    shutil.copy(demo_tokenizer_dir / "spiece.model", tmp_path / "spiece.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0}))
    with pytest.raises(TokenizerError, match=f"{tmp_path}: tokenizer has no sentinel tokens"):
        T5SentencePieceTokenizer(tmp_path)


def test_non_t5_ids_and_non_models_are_rejected_with_the_file_name(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(demo_texts(30)))
    spm.SentencePieceTrainer.train(  # SentencePiece's defaults: unk 0, bos 1, eos 2
        input=str(lines), model_prefix=str(tmp_path / "plain"), vocab_size=300, minloglevel=2
    )
    with pytest.raises(TokenizerError, match=r"plain\.model: pad/eos/unk ids are .* T5 needs \(0, 1, 2\)"):
        T5SentencePieceTokenizer(tmp_path / "plain.model")
    (tmp_path / "junk.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a SentencePiece model"):
        T5SentencePieceTokenizer(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match=r"missing\.model: SentencePiece model not found"):
        T5SentencePieceTokenizer(tmp_path / "missing.model")


def test_decode_inverts_encode_around_sentinels(demo_tokenizer_dir):
    tok = T5SentencePieceTokenizer(demo_tokenizer_dir / "spiece.model")
    ids = tok.encode("The address<extra_id_0> the nation<extra_id_1>")
    assert tok.sentinel_id(0) in ids and tok.sentinel_id(1) in ids
    assert tok.decode(ids) == "The address<extra_id_0> the nation<extra_id_1>"


def test_existing_model_is_not_overwritten_without_force(demo_tokenizer_dir):
    with pytest.raises(Exception, match="--force"):
        train_tokenizer([str(DEMO / "c4-validation.*.json.gz")], demo_tokenizer_dir, vocab_size=2000)
