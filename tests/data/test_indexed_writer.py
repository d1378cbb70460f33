"""Our ``.bin/.idx`` writer against Megatron-Core's ``IndexedDatasetBuilder``: byte for byte."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from spactor_mega.data.indexed_writer import DTYPE_CODES, IndexedDatasetWriter, optimal_dtype

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def documents(vocab_size, n=40, seed=0):
    """Token arrays of varied lengths (a few long, one empty), ids over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=n)
    lengths[[3, 17]] = [4000, 1]
    lengths[9] = 0
    docs = [rng.integers(0, vocab_size, size=k) for k in lengths]
    docs[0][:2] = [0, vocab_size - 1]
    return docs


def megatron_files(megatron, prefix, docs, dtype):
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def our_files(prefix, docs, dtype, batched):
    writer = IndexedDatasetWriter(f"{prefix}.bin", dtype)
    if batched:  # as preprocessing adds them: chunks of documents back to back
        for start in range(0, len(docs), 7):
            chunk = docs[start : start + 7]
            flat = np.concatenate(chunk).astype(dtype) if chunk else np.zeros(0, dtype)
            writer.add_documents(flat, [len(d) for d in chunk])
    else:
        for doc in docs:
            writer.add_document(doc, [len(doc)])
    writer.finalize(f"{prefix}.idx")
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.mark.parametrize("vocab_size", [8_100, 32_128, 65_499, 65_500, 250_112])
@pytest.mark.parametrize("batched", [False, True])
def test_byte_identical_to_megatron_and_readable(tmp_path, megatron, vocab_size, batched):
    dtype = optimal_dtype(vocab_size)
    assert dtype is megatron.DType.optimal_dtype(vocab_size)
    assert dtype is (np.uint16 if vocab_size < 65_500 else np.int32)
    docs = documents(vocab_size)
    ours = our_files(tmp_path / "ours", docs, dtype, batched)
    assert ours == megatron_files(megatron, tmp_path / "megatron", docs, dtype)

    ds = megatron.IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and ds.index.dtype is dtype
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    for i, doc in enumerate(docs):
        assert np.asarray(ds[i]).tolist() == doc.tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_empty_datasets_match_megatron(tmp_path, megatron, dtype):
    # no documents at all, and only empty documents: Megatron writes the same index; its
    # IndexedDataset cannot map the empty .bin either way (preprocessing never writes these)
    for name, docs in {"none": [], "empty_docs": [np.zeros(0, np.int64)] * 3}.items():
        ours = our_files(tmp_path / f"ours_{name}", docs, dtype, batched=False)
        assert ours == megatron_files(megatron, tmp_path / f"megatron_{name}", docs, dtype), name
        assert ours[0] == b""
    batched = our_files(tmp_path / "batched", [np.zeros(0, np.int64)] * 3, dtype, batched=True)
    assert batched == our_files(tmp_path / "single", [np.zeros(0, np.int64)] * 3, dtype, batched=False)


def test_multi_sequence_documents_match_megatron(tmp_path, megatron):
    rng = np.random.default_rng(1)
    docs = [(rng.integers(0, 1000, size=sum(lens)), lens) for lens in ([3, 5], [7], [1, 1, 1], [4, 0])]
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    writer = IndexedDatasetWriter(str(tmp_path / "o.bin"), np.uint16)
    for tokens, lens in docs:
        builder.add_document(tokens, lens)
        writer.add_document(tokens, lens)
    builder.finalize(str(tmp_path / "m.idx"))
    writer.finalize(str(tmp_path / "o.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"o{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes()
    ds = megatron.IndexedDataset(str(tmp_path / "o"))
    assert ds.document_indices.tolist() == [0, 2, 3, 6, 8]


def test_layout_constants_match_megatron(megatron):
    assert {d.name: d.value for d in megatron.DType} == DTYPE_CODES
    assert megatron._INDEX_HEADER == b"MMIDIDX\x00\x00"
    for cardinality in (None, 0, 65_499, 65_500, 10**6):
        assert optimal_dtype(cardinality) is megatron.DType.optimal_dtype(cardinality)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetWriter(str(tmp_path / "x.bin"), np.uint32)
    with IndexedDatasetWriter(str(tmp_path / "x.bin"), np.uint16) as writer:
        with pytest.raises(ValueError, match="sum to 4, but 3 tokens"):
            writer.add_documents(np.arange(3), [2, 2])
        with pytest.raises(ValueError, match="sum to 2, but 3 tokens"):
            writer.add_document(np.arange(3), [2])
        with pytest.raises(ValueError, match=">= 0"):
            writer.add_documents(np.arange(3), [4, -1])
        with pytest.raises(ValueError, match="without lengths"):
            writer.add_documents(np.arange(3), [])
        assert writer.documents == writer.sequences == writer.tokens == 0
    assert writer.data_file.closed


def test_imports_numpy_only():
    probe = ("import sys; import spactor_mega.data.indexed_writer; "
             "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
