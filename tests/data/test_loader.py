"""The micro-batch loader builds, in workers or not, exactly the batches the step-by-step path builds."""

import numpy as np
import pytest
import torch

from spactor_mega.data.dataset import (
    PretrainingSampler,
    SpactorBatchBuilder,
    collate_raw,
)
from spactor_mega.data.loader import MicroBatchDataset, micro_batch_loader
from tests.data.test_dataset import SP_SIZE, build, corruption, write_indexed

MICRO, DP, GLOBAL, STEPS, TAU = 2, 2, 8, 6, 3  # 2 micro-batches per step and rank; tau inside the run


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(3, SP_SIZE, size=rng.integers(5, 200))) + [1] for _ in range(100)]
    train, _ = build(write_indexed(tmp_path_factory.mktemp("idx") / "corpus", docs), train_samples=STEPS * GLOBAL)
    return train


def step_by_step(samples, builder, consumed, dp_rank):
    """The batches as the loop built them before: raw chunks by the sampler, a step's
    micro-batches in turn, MLM fields while the step is below tau."""
    raws = iter(PretrainingSampler(STEPS * GLOBAL, consumed, MICRO, dp_rank, DP))
    batches = []
    for step in range(consumed // GLOBAL, STEPS):
        for _ in range(GLOBAL // (MICRO * DP)):
            raw = collate_raw([samples[i] for i in next(raws)])
            batches.append(builder(raw["raw"], raw["key"], with_mlm=step < TAU))
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 2 * GLOBAL])  # from the start, and resumed at step 2
def test_loader_builds_the_step_by_step_batches(samples, num_workers, consumed):
    builder = SpactorBatchBuilder(corruption(), SP_SIZE, 0.15)
    dp_rank = 1
    sampler = PretrainingSampler(STEPS * GLOBAL, consumed, MICRO, dp_rank, DP)
    loader = micro_batch_loader(MicroBatchDataset(samples, builder, sampler, GLOBAL, TAU), num_workers, 2)
    ours = list(loader)
    expected = step_by_step(samples, builder, consumed, dp_rank)
    assert len(ours) == len(expected) == (STEPS - consumed // GLOBAL) * GLOBAL // (MICRO * DP)
    assert any("mlm_positions" in b for b in expected) and any("mlm_positions" not in b for b in expected)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a.keys() == b.keys(), i
        for key in b:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)
