"""SpacTor samples: pure functions of (seed, index); disjoint across DP ranks; resumable."""

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from spactor_mega.data import dataset as dataset_module
from spactor_mega.data.dataset import (
    DataError,
    PretrainingSampler,
    RangeSplitBuilder,
    SpactorBatchBuilder,
    SpactorDataset,
    SpactorDatasetConfig,
    build_datasets,
    collate_raw,
    open_indexed_dataset,
)
from spactor_mega.data.span_corruption import SpanCorruption

SP_SIZE = 500
FIRST_SENTINEL = SP_SIZE + 99
ENCODER_LENGTH = 64


def write_indexed(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.asarray(doc, dtype=np.int64)), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, SP_SIZE, size=rng.integers(5, 200))) + [1] for _ in range(600)]
    return write_indexed(tmp_path_factory.mktemp("idx") / "corpus", docs), docs


def corruption():
    return SpanCorruption(ENCODER_LENGTH, FIRST_SENTINEL)


def build(prefix, seed=1, train_samples=2000, valid=(), split="90,10,0"):
    return build_datasets([prefix], list(valid), split, corruption(), seed, train_samples, 50)


def test_chunks_are_the_concatenated_split_documents(corpus):
    prefix, docs = corpus
    train, _ = build(prefix)
    dataset = train.datasets[0] if hasattr(train, "datasets") else train
    stream = np.concatenate([docs[i] for i in dataset.documents])
    length = corruption().raw_length
    for chunk in (0, 5, dataset.chunks_per_epoch - 1):
        np.testing.assert_array_equal(dataset.raw_chunk(chunk), stream[chunk * length : (chunk + 1) * length])
    # One epoch visits every chunk once.
    first_epoch = {int(dataset.epoch_order(0)[i]) for i in range(dataset.chunks_per_epoch)}
    assert first_epoch == set(range(dataset.chunks_per_epoch))


def test_train_and_valid_splits_share_no_document(corpus):
    prefix, _ = corpus
    train, valid = build(prefix)
    assert set(train.documents) & set(valid.documents) == set()


SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.data.test_dataset import build, batch_for
train, _ = build({prefix!r})
batch = batch_for(train, [3, 777, 1500], with_mlm=True)
print(json.dumps({{k: v.tolist() for k, v in batch.items()}}))
"""


def batch_for(dataset, indices, with_mlm):
    raw = collate_raw([dataset[i] for i in indices])
    return SpactorBatchBuilder(corruption(), SP_SIZE, 0.15)(raw["raw"], raw["key"], with_mlm)


def test_same_seed_and_index_give_the_same_sample_in_a_fresh_process(corpus):
    prefix, _ = corpus
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=root, prefix=prefix)], capture_output=True, text=True, check=True
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    train, _ = build(prefix)
    ours = batch_for(train, [3, 777, 1500], with_mlm=True)
    for key, value in ours.items():
        assert value.tolist() == theirs[key], key
    other_seed, _ = build(prefix, seed=2)
    assert not torch.equal(batch_for(other_seed, [3, 777, 1500], True)["enc_tokens"], ours["enc_tokens"])


def test_stage_two_batches_carry_no_mlm_fields_and_match_stage_one(corpus):
    prefix, _ = corpus
    train, _ = build(prefix)
    hybrid = batch_for(train, [1, 2], with_mlm=True)
    sc_only = batch_for(train, [1, 2], with_mlm=False)
    assert set(hybrid) - set(sc_only) == {"mlm_positions", "mlm_targets", "mlm_weights", "sample_keys"}
    for key in sc_only:
        assert torch.equal(sc_only[key], hybrid[key])
    np.testing.assert_array_equal(
        hybrid["mlm_targets"], torch.gather(hybrid["enc_tokens"], 1, hybrid["mlm_positions"])
    )


def test_data_parallel_ranks_see_disjoint_samples():
    seen = []
    for rank in range(4):
        seen.append([i for mb in PretrainingSampler(1000, 0, 5, rank, 4) for i in mb])
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == 1000


def test_resuming_at_sample_k_continues_identically(corpus):
    prefix, _ = corpus
    train, _ = build(prefix)
    full = list(PretrainingSampler(400, 0, 4, 1, 2))
    resumed = list(PretrainingSampler(400, 80, 4, 1, 2))
    assert resumed == full[10:]
    a = batch_for(train, full[10], True)
    b = batch_for(build(prefix)[0], resumed[0], True)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_samples_beyond_one_epoch_reshuffle(corpus):
    prefix, _ = corpus
    train, _ = build(prefix, train_samples=5000)
    n = train.chunks_per_epoch
    assert len(train) >= 5000 > n
    epoch0 = [int(train.epoch_order(0)[i]) for i in range(n)]
    epoch1 = [int(train.epoch_order(1)[i]) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_blending_two_corpora_by_weight(tmp_path, corpus):
    prefix, _ = corpus
    rng = np.random.default_rng(1)
    other = write_indexed(tmp_path / "other", [list(rng.integers(3, SP_SIZE, 300)) + [1] for _ in range(200)])
    train, _ = build_datasets(["0.75", prefix, "0.25", other], [], "90,10,0", corruption(), 1, 1000, 20)
    counts = np.bincount(train.dataset_index[:1000], minlength=2) / 1000
    assert abs(counts[0] - 0.75) < 0.02


def test_missing_truncated_and_corrupt_index_files_are_named(tmp_path, corpus):
    prefix, _ = corpus
    with pytest.raises(DataError, match=r"nothing\.idx: indexed dataset file not found"):
        open_indexed_dataset(str(tmp_path / "nothing"))
    data = open(prefix + ".bin", "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.idx").write_bytes(open(prefix + ".idx", "rb").read())
    with pytest.raises(DataError, match=r"cut\.bin: truncated .* rebuild"):
        open_indexed_dataset(str(tmp_path / "cut"))
    (tmp_path / "bad.bin").write_bytes(data)
    (tmp_path / "bad.idx").write_bytes(b"not an index at all")
    with pytest.raises(DataError, match=r"bad\.idx: not a readable Megatron index"):
        open_indexed_dataset(str(tmp_path / "bad"))


def test_a_split_smaller_than_one_chunk_is_rejected(tmp_path):
    prefix = write_indexed(tmp_path / "small", [[5, 6, 7, 1]] * 3)
    with pytest.raises(DataError, match="fewer than one chunk"):
        build(prefix)


@pytest.mark.parametrize("split", ["90,10,0", "98,2,0", "1,1,1", "70,30,0"])
def test_splits_are_megatrons(corpus, split):
    """``RangeSplitBuilder`` hands each split the documents Megatron's own builder gives it."""
    prefix, _ = corpus
    config = SpactorDatasetConfig(blend=([prefix], None), split=split, random_seed=1,
                                  sequence_length=corruption().raw_length, mid_level_dataset_surplus=0.005)
    megatrons = BlendedMegatronDatasetBuilder(SpactorDataset, [100, 10, 10], lambda: True, config).build()
    ours = RangeSplitBuilder(SpactorDataset, [100, 10, 10], lambda: True, config).build()
    assert [d and d.documents for d in ours] == [d and d.documents for d in megatrons]
    assert all(isinstance(d.indices, range) for d in ours if d)


def test_building_the_splits_allocates_nothing_per_document(tmp_path, monkeypatch):
    """Megatron's builder allocates an int32 array of each split's documents (4 B each); ours no
    array per document (numpy's allocations are traced by tracemalloc)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = 1_000_000
    builder = IndexedDatasetBuilder(str(tmp_path / "many.bin"), dtype=np.uint16)
    builder.add_document(torch.full((3 * docs,), 7), [3] * docs)
    builder.finalize(str(tmp_path / "many.idx"))
    monkeypatch.setattr(dataset_module, "INDEX_BLOCK", 1024)  # the offsets' build buffer: small
    tracemalloc.start()
    try:
        build_datasets([str(tmp_path / "many")], [], "98,2,0", corruption(), 1, 10, 10, str(tmp_path / "cache"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < docs  # under 1 B per document
