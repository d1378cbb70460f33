"""The dataset's index cache: equal to the in-memory build, built once, rebuilt when stale or damaged."""

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from spactor_mega.data import dataset as dataset_module
from spactor_mega.data.dataset import DataError, build_datasets, open_indexed_dataset
from spactor_mega.data.index_cache import cached_array
from spactor_mega.data.span_corruption import SpanCorruption
from spactor_mega.parallel.testing import run_distributed
from tests.data.test_dataset import FIRST_SENTINEL, SP_SIZE, corruption, write_indexed


def write_corpus(prefix, seed=0, count=400):
    rng = np.random.default_rng(seed)
    return write_indexed(prefix, [list(rng.integers(3, SP_SIZE, size=rng.integers(5, 200))) + [1] for _ in range(count)])


def build(prefix, cache_dir, seed=1, train_samples=3000):
    return build_datasets([prefix], [], "90,10,0", corruption(), seed, train_samples, 50, str(cache_dir))


def in_memory_offsets(prefix, dataset):
    """The document offsets as built before the cache: int64 cumulative lengths."""
    indexed = open_indexed_dataset(prefix)  # kept alive: its arrays are views of its mapping
    lengths = indexed.sequence_lengths[np.asarray(dataset.documents)].astype(np.int64)
    return np.concatenate([[0], np.cumsum(lengths)])


def cache_files(cache_dir):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_dir.glob("*.npy")}


@pytest.mark.parametrize("block", [dataset_module.INDEX_BLOCK, 7])  # 7: built in many blocks
def test_cached_index_equals_the_in_memory_build_and_is_mapped(tmp_path, monkeypatch, block):
    monkeypatch.setattr(dataset_module, "INDEX_BLOCK", block)
    prefix = write_corpus(tmp_path / "corpus")
    train, valid = build(prefix, tmp_path / "cache")
    for dataset in (train, valid):
        np.testing.assert_array_equal(dataset.offsets, in_memory_offsets(prefix, dataset))
        assert isinstance(dataset.offsets, np.memmap) and not dataset.offsets.flags.writeable
    assert sorted(p.name.partition("-")[2] for p in (tmp_path / "cache").glob("*.npy")) == ["offsets.npy"] * 2


def test_without_cache_dir_the_index_sits_next_to_the_data_like_megatrons(tmp_path):
    prefix = write_corpus(tmp_path / "corpus")
    train, _ = build_datasets([prefix], [], "90,10,0", corruption(), 1, 100, 10)
    assert train.cache_dir == tmp_path / "corpus" / "cache" / "SpactorDataset_indices"
    assert Path(train.offsets.filename).parent == train.cache_dir


def test_a_second_construction_maps_the_files_without_building(tmp_path):
    prefix = write_corpus(tmp_path / "corpus")
    first, _ = build(prefix, tmp_path / "cache")
    assert first.index_builds == 1  # the offsets; the epoch order is computed, not stored
    files = cache_files(tmp_path / "cache")
    again, _ = build(prefix, tmp_path / "cache")
    assert again.index_builds == 0
    assert cache_files(tmp_path / "cache") == files
    assert again[123]["raw"].tolist() == first[123]["raw"].tolist()


def test_a_changed_input_gets_its_own_files(tmp_path):
    prefix = write_corpus(tmp_path / "corpus")
    base, _ = build(prefix, tmp_path / "cache")
    other_seed, _ = build(prefix, tmp_path / "cache", seed=2)
    assert other_seed.index_builds == 0  # same document offsets, another order
    assert not np.array_equal(other_seed.epoch_order(0)[np.arange(50)], base.epoch_order(0)[np.arange(50)])
    longer = build_datasets([prefix], [], "90,10,0", SpanCorruption(128, FIRST_SENTINEL), 1, 3000, 50, str(tmp_path / "cache"))[0]
    assert longer.index_builds == 0 and longer.chunks_per_epoch < base.chunks_per_epoch  # offsets are per token
    write_corpus(prefix, seed=1, count=300)  # the data rewritten in place: a new .idx
    rewritten, _ = build(prefix, tmp_path / "cache")
    assert rewritten.index_builds == 1
    np.testing.assert_array_equal(rewritten.offsets, in_memory_offsets(prefix, rewritten))


def test_a_truncated_or_overwritten_cache_file_is_rebuilt_and_named(tmp_path, caplog):
    prefix = write_corpus(tmp_path / "corpus")
    first, valid = build(prefix, tmp_path / "cache")
    truncated, overwritten = first.offsets.filename, valid.offsets.filename
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(overwritten, "wb") as f:
        f.write(b"garbage")
    with caplog.at_level(logging.WARNING, logger="spactor_mega.data.index_cache"):
        again, again_valid = build(prefix, tmp_path / "cache")
    assert again.index_builds == again_valid.index_builds == 1
    assert f"{truncated}: unreadable index cache" in caplog.text
    assert f"{overwritten}: unreadable index cache" in caplog.text
    for dataset in (again, again_valid):
        np.testing.assert_array_equal(dataset.offsets, in_memory_offsets(prefix, dataset))


def test_an_unwritable_cache_dir_names_the_config_field(tmp_path):
    prefix = write_corpus(tmp_path / "corpus")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the dataset index cache .* set data\.cache_dir"):
        build(prefix, tmp_path / "file")


def _fill_arange(out):
    out[:] = np.arange(len(out))


def _cached_in_process(path, results):
    array, built = cached_array(path, (1 << 20,), np.int64, _fill_arange)
    results.put((built, int(array[-1])))


def test_concurrent_processes_build_once_and_all_map_it(tmp_path):
    """A node-local cache: no barrier orders the processes, the lock file does."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_cached_in_process, args=(tmp_path / "a.npy", results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(outcomes) == [(False, (1 << 20) - 1)] * 3 + [(True, (1 << 20) - 1)]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _rank_builds(rank, world_size, prefix, cache_dir):
    import torch

    torch.distributed.init_process_group("gloo")
    train, valid = build(prefix, cache_dir)
    return {"builds": train.index_builds + valid.index_builds, "order": train.epoch_order(0)[np.arange(50)].tolist()}


def test_two_ranks_build_the_index_once(tmp_path):
    prefix = write_corpus(tmp_path / "corpus")
    ranks = run_distributed(_rank_builds, 2, prefix, str(tmp_path / "cache"), timeout=120)
    assert sum(r["builds"] for r in ranks) == 2  # train and valid offsets
    assert ranks[0]["order"] == ranks[1]["order"]
