"""Our T5 tokenizer wrapper gives Hugging Face's ids, sentinels included; bad files are named."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from spactor_mega.data.tokenizer import T5SentencePieceTokenizer, TokenizerError
from spactor_mega.data.train_tokenizer import train_tokenizer
from tests.hf_families import append_pieces, mt5_sentinel_pieces, write_tokenizer

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


# The T5 family's sentinel layouts (tests/hf_families.py builds each family's tokenizer files) ----
def _hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _with_spaced_sentinels(texts, n):
    """Sentinels between words, where span corruption puts them and HF's tokenizers see them."""
    return [" ".join(f"{w} <extra_id_{(i * 37) % n}>" if i % 7 == 3 else w for i, w in enumerate(t.split()[:300]))
            for t in texts]


@pytest.fixture(scope="module")
def mt5_dir(demo_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt5_tok")
    write_tokenizer("mt5", out, demo_tokenizer_dir / "spiece.model")
    return out


def test_mt5_sentinels_inside_the_model_are_its_top_pieces_counting_down(mt5_dir, demo_tokenizer_dir):
    pieces = spm.SentencePieceProcessor(model_file=str(demo_tokenizer_dir / "spiece.model")).get_piece_size()
    tok = T5SentencePieceTokenizer(mt5_dir)
    assert tok.sp.get_piece_size() == pieces + 100
    assert tok.sentinels_in_model and tok.hf_extra_ids == 0 and tok.num_sentinels == 100
    assert tok.sp_size == pieces  # ids below the sentinels: what the generator may sample
    assert tok.sentinel_id(0) == pieces + 99 and tok.sp.id_to_piece(tok.sentinel_id(0)) == "\u2581<extra_id_0>"
    assert tok.sentinel_id(99) == pieces and tok.sp.id_to_piece(pieces) == "\u2581<extra_id_99>"
    assert tok.mask_id == tok.vocab_size == pieces + 100 and tok.model_vocab_size == pieces + 101
    # The bare .model (no tokenizer_config.json beside it) finds them too.
    bare = mt5_dir.parent / "bare_mt5.model"
    shutil.copy(mt5_dir / "spiece.model", bare)
    assert T5SentencePieceTokenizer(bare).sentinel_id(0) == pieces + 99


def test_mt5_sentinel_pieces_leave_ordinary_text_as_it_was(mt5_dir, demo_tokenizer_dir):
    before = spm.SentencePieceProcessor(model_file=str(demo_tokenizer_dir / "spiece.model"))
    after = spm.SentencePieceProcessor(model_file=str(mt5_dir / "spiece.model"))
    texts = demo_texts()
    assert [before.encode(t) for t in texts] == [after.encode(t) for t in texts]


def test_mt5_ids_match_hugging_face_on_the_same_folder(mt5_dir):
    from transformers import T5Tokenizer

    hf = T5Tokenizer.from_pretrained(str(mt5_dir), extra_ids=0)  # as google/mt5-*'s tokenizer_config.json
    ours = T5SentencePieceTokenizer(mt5_dir)
    assert len(hf) == ours.vocab_size
    assert hf.convert_ids_to_tokens([ours.sentinel_id(k) for k in (0, 1, 99)]) == [
        "\u2581<extra_id_0>", "\u2581<extra_id_1>", "\u2581<extra_id_99>"]
    texts = demo_texts()
    with_sentinels = _with_spaced_sentinels(texts[:50], 100)
    assert sum(t.count("<extra_id_") for t in with_sentinels) > 100
    for text in texts + with_sentinels + ["<extra_id_0> starts it", "ends with <extra_id_99>."]:
        assert ours.encode(text, add_eos=True) == hf(text)["input_ids"]


def test_mt5_encode_and_decode_around_sentinels(mt5_dir):
    tok = T5SentencePieceTokenizer(mt5_dir)
    ids = tok.encode("The address<extra_id_0> the nation <extra_id_1>")
    assert ids.count(tok.sentinel_id(0)) == 1 and ids.count(tok.sentinel_id(1)) == 1
    assert tok.decode(ids) == "The address<extra_id_0> the nation<extra_id_1>"
    assert tok.decode([tok.sentinel_id(7), tok.mask_id]) == "<extra_id_7><mask>"
    # A sentinel number the tokenizer lacks stays text, as in HF.
    assert tok.sentinel_id(0) not in tok.encode("<extra_id_100>")


def test_umt5_sentinels_follow_the_declared_extra_ids(demo_tokenizer_dir, tmp_path):
    write_tokenizer("umt5", tmp_path, demo_tokenizer_dir / "spiece.model")  # extra_ids 300, appended
    ours = T5SentencePieceTokenizer(tmp_path)
    pieces = ours.sp.get_piece_size()
    assert not ours.sentinels_in_model and ours.num_sentinels == ours.hf_extra_ids == 300
    assert ours.sp_size == pieces and ours.sentinel_id(0) == pieces + 299 and ours.sentinel_id(299) == pieces
    assert ours.mask_id == pieces + 300
    hf = _hf_tokenizer(tmp_path)
    assert len(hf) == ours.vocab_size
    assert hf.convert_tokens_to_ids("<extra_id_250>") == ours.sentinel_id(250)
    for text in _with_spaced_sentinels(demo_texts(30), 300) + ["x<extra_id_299>y<extra_id_0>"]:
        assert ours.encode(text, add_eos=True) == hf(text)["input_ids"]
    # The .model named directly reads the tokenizer_config.json beside it.
    assert T5SentencePieceTokenizer(tmp_path / "spiece.model").num_sentinels == 300


def test_sentinel_pieces_not_at_the_top_counting_down_are_refused(demo_tokenizer_dir, tmp_path):
    model = demo_tokenizer_dir / "spiece.model"
    below_a_piece = append_pieces(model, tmp_path / "below.model", mt5_sentinel_pieces() + ["\u2581zzz"])
    with pytest.raises(TokenizerError, match=r"below\.model: its sentinel pieces are not its top 100 pieces"):
        T5SentencePieceTokenizer(below_a_piece)
    upward = append_pieces(model, tmp_path / "upward.model", mt5_sentinel_pieces()[::-1])
    with pytest.raises(TokenizerError, match=r"upward\.model: its sentinel pieces are not its top 100 pieces"):
        T5SentencePieceTokenizer(upward)
    gap = mt5_sentinel_pieces()
    del gap[40]
    with pytest.raises(TokenizerError, match=r"gap\.model: its sentinel pieces are not its top 99 pieces"):
        T5SentencePieceTokenizer(append_pieces(model, tmp_path / "gap.model", gap))


def test_sentinels_both_inside_the_model_and_declared_are_refused(mt5_dir, tmp_path):
    shutil.copy(mt5_dir / "spiece.model", tmp_path / "spiece.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: declares extra_ids 100 but spiece\.model "
                                             r"already holds 100 sentinel pieces"):
        T5SentencePieceTokenizer(tmp_path)


@pytest.mark.parametrize("family", ["mt5", "umt5"])
def test_hf_extra_ids_writes_the_tokenizer_back_the_same_way(family, demo_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, T5Tokenizer

    (tmp_path / "in").mkdir()
    write_tokenizer(family, tmp_path / "in", demo_tokenizer_dir / "spiece.model")
    source = T5SentencePieceTokenizer(tmp_path / "in")
    out = tmp_path / "out"  # what an export writes: the .model and HF's files for hf_extra_ids
    out.mkdir()
    shutil.copy(source.model_file, out / "spiece.model")
    T5Tokenizer.from_pretrained(str(out), extra_ids=source.hf_extra_ids).save_pretrained(str(out))
    back = T5SentencePieceTokenizer(out)
    assert (back.sp_size, back.num_sentinels, back.sentinel_id(0), back.mask_id) == (
        source.sp_size, source.num_sentinels, source.sentinel_id(0), source.mask_id)
    assert len(AutoTokenizer.from_pretrained(str(out))) == source.vocab_size
