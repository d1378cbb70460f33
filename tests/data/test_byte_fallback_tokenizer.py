"""A tokenizer trained with ``--byte-fallback --keep-whitespace`` keeps any text exactly, and our
encoder, preprocessing and the HF folder the export writes (transformers' SentencePiece-backed and
tokenizers-backed loaders) give it the same ids; T5's default tokenizer and its export are unchanged."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, SentencePieceBackend, T5Tokenizer

from spactor_mega.cli import main as spactor
from spactor_mega.config import Config, ConfigError
from spactor_mega.convert.hf_export import write_tokenizer
from spactor_mega.data.prepare import ensure_tokenizer
from spactor_mega.data.preprocess import preprocess
from spactor_mega.data.tokenizer import MAX_SENTENCE_BYTES, T5SentencePieceTokenizer
from spactor_mega.data.train_tokenizer import _line_runs, train_tokenizer
from spactor_mega.errors import UserError
from spactor_mega.plan.validate import validate

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo_c4"
CORPUS = str(DEMO / "c4-validation.*.json.gz")
VOCAB = 1000  # small: trains in seconds on the demo corpus

# What T5's vocabulary loses: code (braces, `<`, tabs, indentation, blank lines, trailing spaces),
# double spaces, Greek, CJK and an emoji (none of them in the demo corpus), a CRLF line end.
CODE = (
    "def count(xs):\n"
    "\tif len(xs) < 3 {\n"
    "        return  {x: i for i, x in enumerate(xs)}  \n"
    "\t}\n\n"
    "  Ελληνικά και 中文, 日本語 😀\r\n"
    "x <= y && y >= z;  # done  "
)


def demo_texts():
    with gzip.open(next(DEMO.glob("c4-validation.*.json.gz")), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory):
    """Trained through the command line, as a user would."""
    out = tmp_path_factory.mktemp("exact")
    assert spactor(["tokenizer", "train", "--input", CORPUS, "--output-dir", str(out), "--vocab-size", str(VOCAB),
                    "--byte-fallback", "--keep-whitespace"]) == 0
    return out


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    train_tokenizer([CORPUS], out, vocab_size=VOCAB)
    return out


def exported(model_dir: Path, folder: Path) -> Path:
    """The tokenizer files `spactor convert to-hf` writes beside the model (its own function)."""
    folder.mkdir()
    write_tokenizer(model_dir, folder, extra_ids=100)
    return folder


def assert_round_trips_and_agrees(model_dir: Path, folder: Path, texts: list[str]) -> None:
    ours = T5SentencePieceTokenizer(model_dir / "spiece.model")
    fast = AutoTokenizer.from_pretrained(str(folder))
    # transformers 5's SentencePiece backend (what is left of the slow tokenizers) on the same files
    slow = SentencePieceBackend.from_pretrained(str(folder), vocab_file=str(folder / "spiece.model"))
    assert len(fast) == len(slow) == ours.vocab_size
    for text in texts:
        ids = ours.encode(text, add_eos=True)
        assert fast(text)["input_ids"] == ids
        assert slow(text)["input_ids"] == ids[:-1]  # the backend adds no EOS
        assert ours.decode(ids) == text
        assert fast.decode(ids, skip_special_tokens=True) == text
        # The slow backend's decode joins piece strings (`<0x0A>` stays as written): only its ids are HF's here.


def test_code_newlines_and_any_script_round_trip_with_the_same_ids_in_ours_and_hf(exact_dir, tmp_path):
    ours = T5SentencePieceTokenizer(exact_dir)
    assert ours.byte_fallback and ours.keeps_whitespace
    ids = ours.encode(CODE)
    assert ours.unk_id not in ids
    assert ours.sp.piece_to_id("<0x7B>") in ids  # `{` is not in the demo corpus: spelled in bytes
    folder = exported(exact_dir, tmp_path / "hf")
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    texts = [CODE, " leading space", "trailing  ", "\n", "", "a\u00a0b \ufb01 \uff21", "x<0x41>y"] + demo_texts()[:20]
    assert_round_trips_and_agrees(exact_dir, folder, texts)


def test_sentinels_keep_t5s_ids_and_hf_agrees_around_them(exact_dir, tmp_path):
    ours = T5SentencePieceTokenizer(exact_dir)
    assert (ours.sp_size, ours.sentinel_id(0), ours.sentinel_id(99), ours.mask_id) == (VOCAB, VOCAB + 99, VOCAB, VOCAB + 100)
    folder = exported(exact_dir, tmp_path / "hf")
    fast = AutoTokenizer.from_pretrained(str(folder))
    assert fast.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [VOCAB + 99, VOCAB]
    assert T5SentencePieceTokenizer(folder).num_sentinels == 100  # the folder's config declares them
    for text in ["if x<extra_id_0> {\n\ty<extra_id_1>  z", "<extra_id_5>", "a <extra_id_3>  b"]:
        ids = ours.encode(text, add_eos=True)
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids) == ours.decode(ids) + "</s>"


def test_preprocessing_writes_the_ids_of_our_encoder(exact_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [CODE, "  two spaces\tand a tab\n"]
    corpus = tmp_path / "code.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(corpus)], tmp_path / "code", exact_dir, progress=False)
    ds = IndexedDataset(str(tmp_path / "code"))
    ours = T5SentencePieceTokenizer(exact_dir)
    assert [ds[i].tolist() for i in range(len(ds))] == [ours.encode(t, add_eos=True) for t in texts]


def test_t5s_default_tokenizer_loses_the_text_and_its_export_is_hfs_own(plain_dir, tmp_path):
    """The same round-trip check fails on a tokenizer trained as before: T5's behaviour, unchanged."""
    ours = T5SentencePieceTokenizer(plain_dir)
    assert not ours.byte_fallback and not ours.keeps_whitespace
    assert ours.unk_id in ours.encode(CODE) and ours.decode(ours.encode(CODE)) != CODE
    folder = exported(plain_dir, tmp_path / "hf")
    with pytest.raises(AssertionError):
        assert_round_trips_and_agrees(plain_dir, folder, [CODE])
    # Its export is what HF's T5Tokenizer writes itself, and encodes as ours on ordinary text.
    (tmp_path / "direct").mkdir()
    shutil.copy(plain_dir / "spiece.model", tmp_path / "direct" / "spiece.model")
    T5Tokenizer.from_pretrained(str(tmp_path / "direct"), extra_ids=100).save_pretrained(str(tmp_path / "direct"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_text() == (tmp_path / "direct" / name).read_text()
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert all(hf(t)["input_ids"] == ours.encode(t, add_eos=True) for t in demo_texts()[:20])


def test_spactor_train_builds_the_tokenizer_its_config_asks_for(plain_dir, tmp_path):
    cfg = Config()
    cfg.data.tokenizer = str(tmp_path / "tok")
    cfg.data.train_corpus = [CORPUS]
    cfg.data.tokenizer_vocab_size = VOCAB
    cfg.data.tokenizer_byte_fallback = cfg.data.tokenizer_keep_whitespace = True
    built = ensure_tokenizer(validate(cfg))
    assert built.byte_fallback and built.keeps_whitespace
    assert built.decode(built.encode(CODE)) == CODE
    # An existing tokenizer that does not keep what the config asks for is refused, naming the field.
    cfg.data.tokenizer = str(plain_dir)
    with pytest.raises(UserError, match=r"^data\.tokenizer_byte_fallback is true but .*spiece\.model was "
                                        r"trained without it"):
        ensure_tokenizer(cfg)


def test_keeping_whitespace_without_byte_fallback_is_refused_in_one_line(tmp_path, capsys):
    cfg = Config()
    cfg.data.tokenizer_keep_whitespace = True
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_keep_whitespace needs data\.tokenizer_byte_fallback: "
                                          r"true: .*bytes, not map them to <unk>$"):
        validate(cfg)
    assert spactor(["tokenizer", "train", "--input", CORPUS, "--output-dir", str(tmp_path), "--keep-whitespace"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--keep-whitespace needs --byte-fallback" in err
    assert not (tmp_path / "spiece.model").exists()


def test_a_whitespace_keeping_tokenizer_trains_on_whole_lines_within_sentencepieces_limit():
    long_doc = max(demo_texts(), key=len)
    assert len(long_doc.encode()) > MAX_SENTENCE_BYTES  # it would be skipped whole
    runs = list(_line_runs(long_doc))
    assert "".join(runs) == long_doc and len(runs) > 1
    assert all(len(r.encode()) <= MAX_SENTENCE_BYTES for r in runs) and all(r.endswith("\n") for r in runs[:-1])
