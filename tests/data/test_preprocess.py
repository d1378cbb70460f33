"""C4 text -> Megatron indexed dataset: round trips, determinism, bad lines, corrupt inputs."""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spactor_mega.data import preprocess as pp
from spactor_mega.data import worker_pool
from spactor_mega.data.c4 import (
    BAD_JSON,
    BLANK_LINE,
    EMPTY_TEXT,
    LONE_SURROGATE,
    NO_TOKENS,
    NON_UTF8,
    NOT_OBJECT,
    CorruptFileError,
    InputError,
    ReadStats,
    expand_inputs,
    iter_documents,
    missing_key,
    not_a_string,
)
from spactor_mega.data.preprocess import preprocess
from spactor_mega.data.preprocess_cli import main
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.errors import OutputExistsError

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_spm):
    return T5SentencePieceTokenizer(tiny_spm)


def c4_record(text, i=0):
    return {"text": text, "timestamp": f"2019-04-{i % 28 + 1:02d}T12:00:00Z", "url": f"https://example.com/{i}"}


def write_lines(path, lines):
    """``lines``: dicts (written as JSON) or raw bytes; gzipped when the name ends in .gz."""
    data = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b"\n"
        for line in lines
    )
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def expected_docs(tok, texts, eod=True):
    return [tok.sp.encode(t) + ([tok.eos_id] if eod else []) for t in texts]


def run(inputs, prefix, tiny_spm, **kw):
    kw.setdefault("progress", False)
    return preprocess(inputs, prefix, tiny_spm, **kw)


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".idx"))


# ----------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".json.gz", ".jsonl.gz"])
def test_round_trip_per_format(tmp_path, tiny_spm, tok, tiny_corpus_texts, suffix):
    texts = tiny_corpus_texts[:60]
    path = write_lines(tmp_path / f"part{suffix}", [c4_record(t, i) for i, t in enumerate(texts)])
    result = run([str(path)], tmp_path / "out" / "ds", tiny_spm)
    docs = read_docs(tmp_path / "out" / "ds")
    assert docs == expected_docs(tok, texts)
    assert result.docs == len(texts) and result.tokens == sum(map(len, docs))
    raw_size = len(gzip.decompress(path.read_bytes())) if suffix.endswith(".gz") else path.stat().st_size
    assert result.bytes_read == raw_size
    assert result.skipped == {} and result.dtype == "uint16"
    # documents decode back to their text, EOS last
    for doc, text in zip(docs[:10], texts):
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
        assert tok.decode(doc) == text


def test_round_trip_glob_keeps_sorted_order_across_files(tmp_path, tiny_spm, tok, tiny_corpus_texts):
    texts = tiny_corpus_texts[:90]
    # written out of order; the glob sorts by name: a (json.gz), b (jsonl), c (json)
    write_lines(tmp_path / "c.json", [c4_record(t) for t in texts[60:]])
    write_lines(tmp_path / "a.json.gz", [c4_record(t) for t in texts[:30]])
    write_lines(tmp_path / "b.jsonl", [c4_record(t) for t in texts[30:60]])
    (tmp_path / "NOTES.txt").write_text("not an input")
    run([str(tmp_path / "*.json*")], tmp_path / "ds", tiny_spm)
    assert read_docs(tmp_path / "ds") == expected_docs(tok, texts)
    # a folder of shards reads the same files in the same order, NOTES.txt ignored
    run([str(tmp_path)], tmp_path / "out" / "ds2", tiny_spm)
    assert (tmp_path / "ds.bin").read_bytes() == (tmp_path / "out" / "ds2.bin").read_bytes()
    # explicit files keep the order given
    run([str(tmp_path / "c.json"), str(tmp_path / "a.json.gz")], tmp_path / "ds3", tiny_spm)
    assert read_docs(tmp_path / "ds3") == expected_docs(tok, texts[60:] + texts[:30])


def test_round_trip_datasets_folders(tmp_path, tiny_spm, tok, tiny_corpus_texts):
    datasets = pytest.importorskip("datasets")
    texts = tiny_corpus_texts[:50]
    records = [c4_record(t, i) for i, t in enumerate(texts)]
    columns = {k: [r[k] for r in records] for k in records[0]}
    ds = datasets.Dataset.from_dict(columns)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "shards").mkdir()
    ds.select(range(20)).to_parquet(str(tmp_path / "shards" / "train-00000.parquet"))
    ds.select(range(20, 50)).to_parquet(str(tmp_path / "shards" / "train-00001.parquet"))

    for name in ("saved", "dict", "shards"):
        result = run([str(tmp_path / name)], tmp_path / f"ds_{name}", tiny_spm)
        assert read_docs(tmp_path / f"ds_{name}") == expected_docs(tok, texts), name
        assert result.docs == len(texts)

    stats = ReadStats()
    assert [t for _, t in iter_documents(tmp_path / "saved", stats=stats)] == texts
    assert stats.docs == len(texts)
    with pytest.raises(InputError, match="no column 'body'.*--json-keys"):
        list(iter_documents(tmp_path / "saved", json_keys=("body",)))


def test_no_append_eod_and_several_json_keys(tmp_path, tiny_spm, tok, tiny_corpus_texts):
    texts = tiny_corpus_texts[:20]
    path = write_lines(tmp_path / "t.jsonl", [{"title": f"Title {i}", "text": t} for i, t in enumerate(texts)])
    run([str(path)], tmp_path / "plain", tiny_spm, append_eod=False)
    assert read_docs(tmp_path / "plain") == expected_docs(tok, texts, eod=False)
    run([str(path)], tmp_path / "joined", tiny_spm, json_keys=["title", "text"])
    assert read_docs(tmp_path / "joined") == expected_docs(tok, [f"Title {i}\n{t}" for i, t in enumerate(texts)])


# ----------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------
def test_output_is_byte_identical_for_any_worker_count(tmp_path, tiny_spm, tiny_corpus_texts):
    lines = [c4_record(t, i) for i, t in enumerate(tiny_corpus_texts)]
    lines[7] = b"{broken"  # skips and their report must not depend on workers either
    lines[150] = c4_record("\u200b")
    write_lines(tmp_path / "a.jsonl.gz", lines[:200])
    write_lines(tmp_path / "b.jsonl", lines[200:])
    results = {}
    for workers in (1, 2):
        # small chunks: many work units in flight, finishing out of order
        results[workers] = run([str(tmp_path / "*.json*")], tmp_path / f"w{workers}", tiny_spm,
                               workers=workers, chunk_bytes=1500)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert results[1].report == results[2].report
    assert results[1].skipped == {BAD_JSON: 1, NO_TOKENS: 1}
    run([str(tmp_path / "*.json*")], tmp_path / "big", tiny_spm)  # one chunk per file
    assert (tmp_path / "big.bin").read_bytes() == (tmp_path / "w1.bin").read_bytes()


def test_output_is_byte_identical_to_megatrons_builder(tmp_path, tiny_spm, tok, tiny_corpus_texts):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    texts = tiny_corpus_texts[:120]
    path = write_lines(tmp_path / "a.jsonl.gz", [c4_record(t, i) for i, t in enumerate(texts)])
    run([str(path)], tmp_path / "ours", tiny_spm, workers=2, chunk_bytes=3000)
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=DType.optimal_dtype(tok.vocab_size))
    for doc in expected_docs(tok, texts):
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(str(tmp_path / "megatron.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"megatron{ext}").read_bytes()


@pytest.mark.parametrize("pipe_bytes,chunk_bytes", [(4096, 20_000), (16384, 5_000), (1 << 20, 20_000)])
def test_small_pipes_do_not_deadlock(tmp_path, tiny_spm, tiny_corpus_texts, monkeypatch, pipe_bytes, chunk_bytes):
    """Tasks and results larger than the pipes (4 KB: Linux's smallest), or several queued."""
    import signal as signal_module

    path = write_lines(tmp_path / "a.jsonl", [c4_record(t, i) for i, t in enumerate(tiny_corpus_texts * 10)])
    run([str(path)], tmp_path / "ref", tiny_spm)
    monkeypatch.setattr(worker_pool, "_PIPE_BYTES", pipe_bytes)

    def hung(signum, frame):
        raise TimeoutError("preprocess hung")

    previous = signal_module.signal(signal_module.SIGALRM, hung)
    signal_module.alarm(60)
    try:
        for workers in (1, 2, 3):
            run([str(path)], tmp_path / f"w{workers}", tiny_spm, workers=workers, chunk_bytes=chunk_bytes)
            for ext in (".bin", ".idx"):
                assert (tmp_path / f"w{workers}{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    finally:
        signal_module.alarm(0)
        signal_module.signal(signal_module.SIGALRM, previous)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
BAD_LINES = {  # line content -> reason; good documents go between them
    b'{"text": "unterminated': BAD_JSON,
    b'{"url": "https://example.com", "timestamp": "2019"}': missing_key("text"),
    b'{"text": 42}': not_a_string("text"),
    b'{"text": null}': not_a_string("text"),
    '{"text": "caf\xe9 latin-1"}'.encode("latin-1"): NON_UTF8,
    b'{"text": ""}': EMPTY_TEXT,
    b'{"text": " \\n\\t "}': EMPTY_TEXT,
    b"": BLANK_LINE,
    b'{"text": "lone \\ud800 surrogate"}': LONE_SURROGATE,
    b'"just a string"': NOT_OBJECT,
    b'{"text": "\\u200b"}': NO_TOKENS,  # valid, but the tokenizer makes nothing of it
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json.gz"])
def test_bad_lines_are_skipped_counted_and_reported(tmp_path, tiny_spm, tok, tiny_corpus_texts, capsys, suffix):
    good = tiny_corpus_texts[: len(BAD_LINES) + 1]
    lines, where, read = [], {}, []
    for i, (bad, reason) in enumerate(BAD_LINES.items()):
        lines.append(c4_record(good[i]))
        read.append(good[i])
        lines.append(bad)
        where.setdefault(reason, []).append(len(lines))  # 1-based line number of the bad line
        if reason == NO_TOKENS:
            read.append("\u200b")  # a good line for the reader; only encoding finds it empty
    lines.append(c4_record(good[-1]))
    read.append(good[-1])
    path = write_lines(tmp_path / f"mixed{suffix}", lines)

    result = run([str(path)], tmp_path / "ds", tiny_spm, workers=2, chunk_bytes=200)
    assert read_docs(tmp_path / "ds") == expected_docs(tok, good)  # every good document, in order
    assert result.skipped == {reason: len(nos) for reason, nos in where.items()}
    err = capsys.readouterr().err
    for reason, line_numbers in where.items():
        for n in line_numbers:
            assert f"{path}:{n}: {reason}" in err
    assert f"skipped {len(BAD_LINES)} bad input line(s)" in err

    # the reader alone (as the tokenizer trainer uses it) applies the same rules
    stats = ReadStats()
    assert [t for _, t in iter_documents(path, stats=stats)] == read
    assert stats.docs == len(read)
    assert stats.skipped == {r: len(n) for r, n in where.items() if r != NO_TOKENS}
    assert stats.lines == len(lines)
    assert f"{path}:2: {BAD_JSON} (" in stats.report()


PARSE_CASES = list(BAD_LINES) + [
    b'{"text": "plain ascii"}',
    '{"text": "caf\u00e9 \u2014 na\u00efve \ud55c\uad6d\uc5b4 \U0001f600"}'.encode(),  # raw UTF-8, Hangul (0xed ..)
    b'{"text": "escaped \\u00e9 and a pair \\ud83d\\ude00"}',
    b'{"text": "lone low \\udc00 surrogate"}',
    b'{"text": "upper-case \\uD800 escape"}',
    b'{"text": "fine", "title": "lone \\ud800 elsewhere"}',
    b'{"text": "a", "title": 5}',
    b'{"title": "t"}',
    b'{"text": "\\t\\n"}',
    b'\xef\xbb\xbf{"text": "after a byte order mark"}',
    b'  {"text": "leading blanks"}',
    b'{"text": "trailing garbage"} x',
    b'{"text": "surrogate bytes \xed\xa0\x80"}',
    b"[1, 2]",
    b"{}",
    b"{",
]


@pytest.mark.parametrize("keys", [("text",), ("title", "text")])
def test_fast_parse_matches_parse_line(keys):
    from spactor_mega.data.c4 import BadLine, parse_line

    def outcome(fn, raw):
        try:
            return ("text", fn(raw, keys))
        except BadLine as e:
            return ("bad", e.reason, e.detail)

    for raw in PARSE_CASES + [raw.replace(b'"text"', b'"title": "T", "text"', 1) for raw in PARSE_CASES]:
        assert outcome(pp._parse, raw) == outcome(parse_line, raw), raw


def test_report_keeps_the_first_few_examples_per_reason(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [b"{bad"] * 10 + [{"text": "fine"}])
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == [(11, "fine")]
    assert stats.skipped == {BAD_JSON: 10}
    assert len(stats.examples[BAD_JSON]) == stats.max_examples
    report = stats.report().splitlines()
    assert len(report) == 2 and report[1].startswith(f"  {BAD_JSON}: 10 line(s), first: {path}:1: ")
    assert report[1].endswith(", ...")


def test_all_lines_bad_is_an_error_without_output(tmp_path, tiny_spm):
    path = write_lines(tmp_path / "x.jsonl", [{"body": "text under another key"}] * 3)
    with pytest.raises(InputError, match="no documents written"):
        run([str(path)], tmp_path / "ds", tiny_spm)
    assert leftovers(tmp_path) == []


def test_a_json_array_file_is_named(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(InputError, match=r"array\.json: a JSON array, not JSON Lines"):
        list(iter_documents(path))


# ----------------------------------------------------------------------------------------
# corrupt input
# ----------------------------------------------------------------------------------------
def noisy_gz(path, n_lines=3000):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(2000)]
    lines = [{"text": " ".join(rng.choice(words, size=40))} for _ in range(n_lines)]
    return write_lines(path, lines)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_gzip_is_a_clear_error_and_leaves_no_output(tmp_path, tiny_spm, tiny_corpus_texts, damage):
    good = write_lines(tmp_path / "a.json.gz", [c4_record(t) for t in tiny_corpus_texts[:50]])
    path = noisy_gz(tmp_path / "b.json.gz")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) * 6 // 10])
        message = r"b\.json\.gz: file truncated after line (\d+); re-download it"
    else:
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :])
        message = r"b\.json\.gz: gzip data corrupt \(.*\), detected after line (\d+); re-download it"
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match=message) as info:
        run([str(good), str(path)], out / "ds", tiny_spm, workers=2, chunk_bytes=4096)
    assert info.value.path == str(path)
    assert 0 < info.value.last_good_line < 3000
    assert not out.exists() or list(out.iterdir()) == []  # neither final nor temporary files

    # the reader raises too (never a skipped line); a truncated file yields every line before
    got = []
    with pytest.raises(CorruptFileError):
        for line_no, _ in iter_documents(path):
            got.append(line_no)
    if damage == "truncate":
        assert got == list(range(1, info.value.last_good_line + 1))

    # the command line says it in one line
    code = main(["--input", str(path), "--output-prefix", str(out / "ds"), "--tokenizer", str(tiny_spm)])
    assert code == 1


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "plain.json.gz"
    path.write_text('{"text": "not compressed"}\n')
    with pytest.raises(CorruptFileError, match="plain.json.gz: not a gzip file"):
        list(iter_documents(path))


def test_interrupt_removes_temporary_files(tmp_path, tiny_spm, tiny_corpus_texts, monkeypatch):
    path = write_lines(tmp_path / "a.jsonl", [c4_record(t) for t in tiny_corpus_texts])
    real_iter_lines = pp.iter_lines

    def interrupted(path, stats=None):
        for i, item in enumerate(real_iter_lines(path, stats)):
            if i == 200:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(pp, "iter_lines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([str(path)], tmp_path / "ds", tiny_spm, chunk_bytes=2000)
    assert leftovers(tmp_path) == []


def test_worker_error_is_raised_with_its_traceback_and_leaves_no_output(tmp_path, tiny_spm, tiny_corpus_texts,
                                                                        monkeypatch):
    path = write_lines(tmp_path / "a.jsonl", [c4_record(t) for t in tiny_corpus_texts])
    real_work = pp._work

    def failing(task):  # forked workers inherit the patched module
        if task[1] > 100:
            raise ZeroDivisionError("bug in a worker")
        return real_work(task)

    monkeypatch.setattr(pp, "_work", failing)
    with pytest.raises(ZeroDivisionError, match="bug in a worker") as info:
        run([str(path)], tmp_path / "ds", tiny_spm, workers=2, chunk_bytes=2000)
    assert "in failing" in str(info.value.__cause__)
    assert leftovers(tmp_path) == []


def test_worker_death_is_an_error_and_leaves_no_output(tmp_path, tiny_spm, tiny_corpus_texts, monkeypatch):
    path = write_lines(tmp_path / "a.jsonl", [c4_record(t) for t in tiny_corpus_texts])
    real_work = pp._work

    def dying(task):
        if task[1] > 100:
            os._exit(3)
        return real_work(task)

    monkeypatch.setattr(pp, "_work", dying)
    with pytest.raises(RuntimeError, match=r"worker preprocess-\d died \(exit code 3\)"):
        run([str(path)], tmp_path / "ds", tiny_spm, workers=2, chunk_bytes=2000)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_exit_when_the_main_process_is_killed(tiny_spm):
    probe = (
        "import multiprocessing as mp, os; from spactor_mega.data import preprocess as pp; "
        "from spactor_mega.data.worker_pool import WorkerPool; "
        f"pool = WorkerPool(2, mp.get_context('fork'), pp._work, pp._init_worker, "
        f"({str(tiny_spm)!r}, ('text',), True, 'uint16')); "
        "print(*[p.pid for p in pool.procs], flush=True); os._exit(0)"  # no clean-up at all
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr

    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, pids))


# ----------------------------------------------------------------------------------------
# outputs, patterns, command line
# ----------------------------------------------------------------------------------------
def test_existing_output_needs_force(tmp_path, tiny_spm, tok, tiny_corpus_texts, capsys):
    first = write_lines(tmp_path / "first.jsonl", [c4_record(t) for t in tiny_corpus_texts[:10]])
    second = write_lines(tmp_path / "second.jsonl", [c4_record(t) for t in tiny_corpus_texts[10:30]])
    prefix = tmp_path / "ds"
    run([str(first)], prefix, tiny_spm)
    before = {ext: (prefix.with_suffix(ext).read_bytes(), prefix.with_suffix(ext).stat().st_mtime_ns)
              for ext in (".bin", ".idx")}
    with pytest.raises(OutputExistsError, match=r"ds\.bin already exists; pass --force"):
        run([str(second)], prefix, tiny_spm)
    args = ["--input", str(second), "--output-prefix", str(prefix), "--tokenizer", str(tiny_spm)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err
    for ext, (data, mtime) in before.items():
        assert prefix.with_suffix(ext).read_bytes() == data and prefix.with_suffix(ext).stat().st_mtime_ns == mtime

    assert main(args + ["--force", "--no-progress", "--workers", "2"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert read_docs(prefix) == expected_docs(tok, tiny_corpus_texts[10:30])
    assert leftovers(tmp_path) == ["ds.bin", "ds.idx"]


def test_inputs_that_match_nothing_are_named(tmp_path, tiny_spm, capsys):
    pattern = str(tmp_path / "nowhere" / "*.json.gz")
    with pytest.raises(InputError, match=rf"^{pattern}: pattern matches no files$".replace("*", r"\*")):
        expand_inputs([pattern])
    with pytest.raises(InputError, match="missing.jsonl: no such file or directory"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: folder holds no"):
        expand_inputs([str(tmp_path / "empty")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt \(matched by .*\): not a supported input"):
        expand_inputs([str(tmp_path / "*.txt")])

    assert main(["--input", pattern, "--output-prefix", str(tmp_path / "ds"), "--tokenizer", str(tiny_spm)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {pattern}: pattern matches no files\n"
    assert leftovers(tmp_path) == []


def test_script_help_and_light_imports():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--input", "--output-prefix", "--workers", "--json-keys", "--append-eod", "--no-append-eod",
                 "--tokenizer", "--force", "--no-progress", "example:"):
        assert flag in proc.stdout
    # no torch / megatron / datasets before there is work to do
    probe = ("import sys; import spactor_mega.data.preprocess_cli; "
             "print(sorted(m for m in ('torch', 'megatron', 'datasets', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_run_imports_neither_torch_nor_megatron(tmp_path, tiny_spm, tiny_corpus_texts):
    path = write_lines(tmp_path / "a.json.gz", [c4_record(t) for t in tiny_corpus_texts[:50]])
    probe = (
        "import sys; from spactor_mega.cli import main; "
        f"code = main(['preprocess', '--input', {str(path)!r}, '--output-prefix', {str(tmp_path / 'ds')!r}, "
        f"'--tokenizer', {str(tiny_spm)!r}, '--workers', '2']); "
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "0 []", out.stderr
    assert "wrote" in out.stderr
    assert len(read_docs(tmp_path / "ds")) == 50


def test_encoder_fallback_without_numpy_output():
    class OldSentencePiece:  # sentencepiece < 0.2.1: no out_type="numpy"
        def encode(self, texts, out_type=int, num_threads=-1, add_eos=False):
            if out_type != int:
                raise ValueError("unknown out_type")
            return [[ord(c) for c in t] + [1] * add_eos for t in texts]

    arrays = pp._encoder(OldSentencePiece())(["ab", ""])
    assert [a.dtype for a in arrays] == [np.int32, np.int32] and [a.tolist() for a in arrays] == [[97, 98], []]
    arrays = pp._encoder(OldSentencePiece(), add_eos=True)(["ab", ""])
    assert [a.tolist() for a in arrays] == [[97, 98, 1], [1]]


def test_encoder_matches_sentencepiece(tok, tiny_corpus_texts):
    texts = tiny_corpus_texts[:30] + ["\u200b", "x"]
    for add_eos in (False, True):
        arrays = pp._encoder(tok.sp, add_eos)(texts)
        assert all(a.dtype == np.int32 for a in arrays)
        assert [a.tolist() for a in arrays] == [tok.sp.encode(t) + [tok.eos_id] * add_eos for t in texts]
