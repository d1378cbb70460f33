"""A finite loss with non-finite gradients in one DeepSpeed engine only: the step changes nothing in
either engine, on every rank.

In the hybrid phase D and G + the RTD head are two DeepSpeed engines, each of which would skip only
its own overflow. ``SPACTOR_TEST_NAN_GRAD_AT_STEP`` makes G's gradients NaN on rank 0 alone (the
other rank sees them only through the reduction) at step 2 of 3 (tau 4: hybrid); a checkpoint
after every step. One 2-process launch (DP = 2, 2 micro-batches per rank) trains ZeRO-0 in bf16 and
ZeRO-2 offloaded and ZeRO-3 in fp32 in turn.
"""

import json
from pathlib import Path

import pytest

from spactor_mega.parallel.testing import run_distributed
from spactor_mega.training.nonfinite import TEST_NAN_GRAD_STEPS_ENV
from tests.training.engine_runs import train_and_inspect
from tests.training.test_nonfinite import _same, _tensors
from tests.training.test_training import tiny_config

NAN_STEP = 2
# (ZeRO stage, precision, offload): places a rank's gradients are kept (and poisoned): the .grad with
# BF16_Optimizer's fp32 accumulation, ZeRO-2's offloaded fragments (whose step decides from norms kept
# during the reduction), ZeRO-3 partitions. (ZeRO-1 bf16 and ZeRO-2 fp32 without offload, and ZeRO-3
# bf16 offloaded, pass too; left out of the suite for its time.)
LAYOUTS = {"zero0_bf16": (0, "bf16", "none"), "zero2_offload": (2, "fp32", "cpu"), "zero3_fp32": (3, "fp32", "none")}


def _config(work: Path, name: str):
    zero, precision, offload = LAYOUTS[name]
    cfg = tiny_config(work / name, train__steps=3, train__save_interval=1, train__micro_batch_size=2,
                      train__engine="deepspeed", train__precision=precision)
    cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer = zero, offload
    cfg.deepspeed.config = str(work / "torch_adam.json")  # DeepSpeed's fused/CPU Adam need a JIT build
    return cfg


def _train_layouts(rank, world_size, work: str):
    import os

    os.environ[TEST_NAN_GRAD_STEPS_ENV] = str(NAN_STEP)
    runs = [(name, _config(Path(work), name)) for name in LAYOUTS]
    return train_and_inspect(runs, lambda cfg, result, engine: result.history)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("nonfinite_gradients")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    return work, run_distributed(_train_layouts, 2, str(work), timeout=600)[0]


@pytest.mark.parametrize("name", LAYOUTS)
def test_nan_gradients_in_g_alone_skip_the_step_in_both_engines(trained, name, tmp_path):
    work, history = trained
    save_dir = work / name / "ckpt"
    state = {step: _tensors(save_dir / f"iter_{step:07d}", tmp_path) for step in (1, 2, 3)}
    assert any("optim" in k for k in state[1]) and any("generator_rtd" in k for k in state[1])
    assert _same(state[1], state[2])  # D, G, the RTD head, both optimizers and both schedules as before step 2
    assert not _same(state[2], state[3])  # a finite step updates
    assert [h["skipped"] for h in history[name]] == [0.0, 1.0, 0.0]
    assert [h["skipped_steps"] for h in history[name]] == [0.0, 1.0, 1.0]
