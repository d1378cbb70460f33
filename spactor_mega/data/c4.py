"""Reading C4-format text: JSON Lines files (plain or gzipped) and local HF ``datasets`` folders.

The public API, shared by preprocessing and tokenizer training:

- :func:`expand_inputs` turns files, globs and folders into a sorted, deterministic list of
  sources; an input that matches nothing is a one-line :class:`InputError` naming it.
- :func:`iter_documents` yields ``(line_no, text)`` for every usable document of one source.
  Malformed lines (bad JSON, missing or non-string key, non-UTF-8 bytes, empty text) are
  skipped and counted by reason in a :class:`ReadStats`, which keeps the first few as
  ``file:line: reason`` for :meth:`ReadStats.report`. A truncated or corrupt ``.gz`` raises
  :class:`CorruptFileError` naming the file and its last good line, never a skipped line.

The lower layers :func:`iter_lines` (raw lines of a JSON Lines file) and :func:`parse_line`
(one raw line to its text, or :class:`BadLine`) let preprocessing parse lines in its workers
with exactly the same rules.

One document is one JSON line (one row of a ``datasets`` source). With several ``json_keys``
the values are joined with a newline, in the order given; every key must be present.

A folder input is either a ``datasets`` folder written by ``save_to_disk`` (read with
``datasets.load_from_disk``; a ``DatasetDict`` gives its ``train`` split) or a folder of
shards: ``.json``/``.jsonl``/``.json.gz``/``.jsonl.gz`` shards are read as files by this module
(so bad lines are reported with line numbers), ``.parquet``/``.arrow`` shards with ``datasets``
in streaming mode, offline, with explicit string features. Only the text columns are read.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

from spactor_mega.errors import UserError

JSON_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
HF_FILE_SUFFIXES = (".parquet", ".arrow")
SUPPORTED = ", ".join(JSON_SUFFIXES[::-1] + HF_FILE_SUFFIXES)
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")

# Fixed reasons (the keys of ReadStats.skipped); details go into the examples only.
BAD_JSON = "bad JSON"
NOT_OBJECT = "not a JSON object"
NON_UTF8 = "non-UTF-8 bytes"
LONE_SURROGATE = "invalid Unicode (lone surrogate escape)"
EMPTY_TEXT = "empty text"
BLANK_LINE = "blank line"
NO_TOKENS = "text encodes to no tokens"


def missing_key(key: str) -> str:
    return f"missing key {key!r}"


def not_a_string(key: str) -> str:
    return f"{key!r} is not a string"


class InputError(UserError):
    """Input that cannot be read as asked; the message is one line naming the file or pattern."""


class CorruptFileError(InputError):
    """A truncated or corrupt compressed file; ``path`` and ``last_good_line`` say where.

    For a truncated file ``last_good_line`` is the last complete line; for corrupt deflate
    data it is where the damage was detected (lines shortly before may be garbled).
    """

    def __init__(self, message: str, path: Union[str, Path] = "", last_good_line: int = 0):
        super().__init__(message)
        self.path = str(path)
        self.last_good_line = last_good_line

    def __reduce__(self):  # picklable with its attributes (raised across processes)
        return (type(self), (self.args[0], self.path, self.last_good_line))


class BadLine(ValueError):
    """One unusable line: ``reason`` is counted, ``detail`` goes into the example."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason} ({detail})")
        self.reason = reason
        self.detail = detail


@dataclass
class ReadStats:
    """What reading saw: documents, bytes, and skipped lines by reason with first examples.

    ``bytes`` counts the uncompressed input bytes read (every line, good or bad; for a
    ``datasets`` source the UTF-8 bytes of the text). ``disk_bytes`` is how far into the
    files on disk reading has got (compressed bytes for ``.gz``), for progress bars.
    """

    docs: int = 0
    bytes: int = 0
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> ["file:line: reason (detail)"]
    disk_bytes: int = 0
    max_examples: int = 3

    def skip(self, path: Union[str, Path], line_no: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(f"{path}:{line_no}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        """One line per reason, most frequent first, with its first ``file:line`` examples."""
        if not self.skipped:
            return ""
        out = [f"skipped {self.total_skipped:,} bad input line(s):"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = "; ".join(self.examples.get(reason, []))
            more = ", ..." if n > len(self.examples.get(reason, [])) else ""
            out.append(f"  {reason}: {n:,} line(s), first: {shown}{more}")
        return "\n".join(out)


# ----------------------------------------------------------------------------------------
# Finding inputs
# ----------------------------------------------------------------------------------------
def is_json_lines(path: Path) -> bool:
    return path.name.endswith(JSON_SUFFIXES)


def is_hf_source(path: Path) -> bool:
    """A source read with ``datasets``: a ``save_to_disk`` folder or a parquet/arrow file."""
    return path.name.endswith(HF_FILE_SUFFIXES) or (path.is_dir() and _is_hf_disk_dir(path))


def _is_hf_disk_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in HF_DISK_MARKERS)


def _expand_dir(folder: Path) -> list[Path]:
    if _is_hf_disk_dir(folder):
        return [folder]
    shards = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .cache and the like
        root_path = Path(root)
        if root_path != folder and _is_hf_disk_dir(root_path):
            shards.append(root_path)
            dirs[:] = []
            continue
        shards += [root_path / f for f in files if f.endswith(JSON_SUFFIXES + HF_FILE_SUFFIXES)
                   and not f.startswith(".")]
    if not shards:
        raise InputError(
            f"{folder}: folder holds no {SUPPORTED} files and is not a `save_to_disk` dataset"
        )
    return sorted(shards, key=lambda p: p.relative_to(folder).as_posix())


def _expand_path(path: Path, pattern: str) -> list[Path]:
    if path.is_dir():
        return _expand_dir(path)
    if not path.is_file():
        raise InputError(f"{pattern}: no such file or directory")
    if not path.name.endswith(JSON_SUFFIXES + HF_FILE_SUFFIXES):
        via = f" (matched by {pattern!r})" if str(path) != pattern else ""
        raise InputError(f"{path}{via}: not a supported input; expected {SUPPORTED} or a folder")
    return [path]


def expand_inputs(patterns: Union[str, Sequence[Union[str, Path]]]) -> list[Path]:
    """Files, globs (``**`` allowed) and folders to a list of sources.

    Each pattern's matches are sorted; patterns keep the order given; a source named twice
    is read once. A pattern that matches nothing raises :class:`InputError` naming it.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise InputError("no input given")
    out: list[Path] = []
    seen: set = set()
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"{pattern}: pattern matches no files")
        else:
            matches = [pattern]
        for match in matches:
            for path in _expand_path(Path(match), pattern):
                key = path.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(path)
    return out


# ----------------------------------------------------------------------------------------
# JSON Lines
# ----------------------------------------------------------------------------------------
def _corrupt(path: Path, line_no: int, err: BaseException) -> CorruptFileError:
    if isinstance(err, EOFError):
        message = f"file truncated after line {line_no}; re-download it"
    elif isinstance(err, gzip.BadGzipFile) and line_no == 0:
        message = f"not a gzip file ({err}); re-download it or fix its name"
    else:  # deflate notices damage late (at worst at the CRC): lines before may be garbled too
        message = f"gzip data corrupt ({err}), detected after line {line_no}; re-download it"
    return CorruptFileError(f"{path}: {message}", path, line_no)


def iter_lines(path: Union[str, Path], stats: Optional[ReadStats] = None) -> Iterator[tuple[int, bytes]]:
    """Raw lines of a JSON Lines file (``.gz`` decompressed), numbered from 1.

    Updates ``stats.lines``, ``stats.bytes`` and ``stats.disk_bytes``. A truncated or
    corrupt gzip raises :class:`CorruptFileError` with the last complete line; a JSON array
    file (first line starts with ``[``) raises :class:`InputError`.
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    try:
        raw_file = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror or e})") from None
    size = os.fstat(raw_file.fileno()).st_size
    disk_base = stats.disk_bytes
    line_no = 0
    with raw_file:
        f = gzip.GzipFile(fileobj=raw_file, mode="rb") if path.name.endswith(".gz") else raw_file
        try:
            for raw in f:
                line_no += 1
                stats.lines += 1
                stats.bytes += len(raw)
                if line_no & 63 == 0:
                    stats.disk_bytes = disk_base + raw_file.tell()
                elif line_no == 1 and raw.lstrip()[:1] == b"[":
                    raise InputError(
                        f"{path}: a JSON array, not JSON Lines (one object per line); "
                        f"convert it, e.g. jq -c '.[]' {path.name}"
                    )
                yield line_no, raw
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise _corrupt(path, line_no, e) from None
        except OSError as e:
            raise InputError(f"{path}: read error after line {line_no} ({e})") from None
    stats.disk_bytes = disk_base + size


def _check_text(text: str, raw_json: Optional[str] = None) -> None:
    if not text or text.isspace():
        raise BadLine(EMPTY_TEXT)
    # json turns a lone "\\udXXX" escape into a surrogate that no tokenizer can encode
    if raw_json is not None and ("\\ud" in raw_json or "\\uD" in raw_json) and has_lone_surrogate(text):
        raise BadLine(LONE_SURROGATE)


def has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_line(raw: bytes, json_keys: Sequence[str] = ("text",)) -> str:
    """One raw JSON line to its document text; raises :class:`BadLine` when unusable."""
    if not raw or raw.isspace():
        raise BadLine(BLANK_LINE)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(NON_UTF8, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None
    if s[0] == "\ufeff":  # a UTF-8 byte order mark
        s = s[1:]
    try:
        obj = json.loads(s)
    except ValueError as e:
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise BadLine(BAD_JSON, detail) from None
    if type(obj) is not dict:
        raise BadLine(NOT_OBJECT, f"got {type(obj).__name__}")
    if len(json_keys) == 1:
        key = json_keys[0]
        text = obj.get(key, _MISSING)
        if type(text) is not str:
            _bad_value(obj, key, text)
    else:
        parts = []
        for key in json_keys:
            value = obj.get(key, _MISSING)
            if type(value) is not str:
                _bad_value(obj, key, value)
            parts.append(value)
        text = "\n".join(parts)
    _check_text(text, s)
    return text


_MISSING = object()


def _json_type(value) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _bad_value(obj: dict, key: str, value) -> None:
    if value is _MISSING:
        keys = ", ".join(list(obj)[:8]) or "none"
        raise BadLine(missing_key(key), f"keys: {keys}")
    if isinstance(value, str):  # a str subclass cannot come from json; be permissive
        return
    raise BadLine(not_a_string(key), f"got {_json_type(value)}")


# ----------------------------------------------------------------------------------------
# HF datasets sources
# ----------------------------------------------------------------------------------------
def _import_datasets():
    """``datasets``, offline and quiet (imported only for folder / parquet / arrow inputs)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets  # optional and slow to import: only these inputs need it
    except ImportError:
        raise InputError("reading parquet, arrow or `save_to_disk` inputs needs `pip install datasets`") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _file_columns(path: Path) -> list[str]:
    # pyarrow comes with the optional `datasets` (called after _import_datasets checked it)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.endswith(".parquet"):
        return pq.read_schema(path).names
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).schema.names
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).schema.names


def _open_hf(path: Path, keys: tuple[str, ...]):
    """A ``datasets`` (Iterable)Dataset over ``keys`` columns, its columns, and its row count."""
    datasets = _import_datasets()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                splits = sorted(ds)
                if "train" in ds:
                    ds = ds["train"]
                elif len(splits) == 1:
                    ds = ds[splits[0]]
                else:
                    raise InputError(
                        f"{path}: a DatasetDict with splits {', '.join(splits)} and no 'train'; "
                        f"give the split's folder, e.g. {path / splits[0]}"
                    )
            columns, rows = list(ds.column_names), len(ds)
        else:
            columns, rows = _file_columns(path), None
            ds = None
        missing = [k for k in keys if k not in columns]
        if missing:
            raise InputError(
                f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)}); "
                "choose the text column with --json-keys"
            )
        if ds is not None:
            return ds.select_columns(list(keys)), rows
        features = datasets.Features({k: datasets.Value("string") for k in keys})
        builder = "parquet" if path.name.endswith(".parquet") else "arrow"
        extra = {"columns": list(keys)} if builder == "parquet" else {}
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **extra)
        ds = ds.select_columns(list(keys)).cast(features)
        return ds, rows
    except InputError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types; keep it one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot read with `datasets` ({msg})") from None


def _hf_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.arrow"))


def _iter_hf_documents(path: Path, keys: tuple[str, ...], stats: ReadStats) -> Iterator[tuple[int, str]]:
    ds, rows = _open_hf(path, keys)
    size = _hf_size(path)
    disk_base = stats.disk_bytes
    row = 0
    for batch in ds.iter(batch_size=1000):
        columns = [batch[k] for k in keys]
        for values in zip(*columns):
            row += 1
            stats.lines += 1
            try:
                for key, value in zip(keys, values):
                    if type(value) is not str:
                        raise BadLine(not_a_string(key), f"got {_json_type(value)}")
                text = values[0] if len(keys) == 1 else "\n".join(values)
                stats.bytes += len(text.encode("utf-8"))
                _check_text(text)
            except BadLine as e:
                stats.skip(path, row, e.reason, e.detail)
                continue
            stats.docs += 1
            yield row, text
        if rows:
            stats.disk_bytes = disk_base + size * row // rows
    stats.disk_bytes = disk_base + size


# ----------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------
def normalize_keys(json_keys: Union[str, Iterable[str]]) -> tuple[str, ...]:
    keys = (json_keys,) if isinstance(json_keys, str) else tuple(json_keys)
    if not keys:
        raise InputError("json_keys is empty; give at least one key, e.g. text")
    return keys


def source_size(path: Union[str, Path]) -> int:
    """Bytes on disk of one source (for progress totals)."""
    path = Path(path)
    return _hf_size(path) if is_hf_source(path) else path.stat().st_size


def iter_documents(
    path: Union[str, Path],
    json_keys: Union[str, Sequence[str]] = ("text",),
    stats: Optional[ReadStats] = None,
) -> Iterator[tuple[int, str]]:
    """``(line_no, text)`` for every usable document of one source, in file order.

    ``line_no`` counts from 1 (rows for a ``datasets`` source). Bad lines are skipped and
    recorded in ``stats`` (pass one to see them); a truncated ``.gz`` raises
    :class:`CorruptFileError`.
    """
    path = Path(path)
    keys = normalize_keys(json_keys)
    stats = stats if stats is not None else ReadStats()
    if is_hf_source(path):
        yield from _iter_hf_documents(path, keys, stats)
        return
    if not is_json_lines(path):
        raise InputError(f"{path}: not a supported input; expected {SUPPORTED} or a folder")
    for line_no, raw in iter_lines(path, stats):
        try:
            text = parse_line(raw, keys)
        except BadLine as e:
            stats.skip(path, line_no, e.reason, e.detail)
            continue
        stats.docs += 1
        yield line_no, text
