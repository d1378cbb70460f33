"""Non-finite steps: a NaN loss injected on one data-parallel rank (``SPACTOR_TEST_NAN_AT_STEP``)
changes no weight, optimizer state or LR schedule, on every rank and stage, in both engines; the
skips are counted; ``train.max_skipped_steps`` of them in a row stop the run with one message.

One 2-process launch trains each layout in turn: Megatron at DP=2, Megatron at PP=2 (the loss exists
on the last stage only) and DeepSpeed ZeRO-2 at DP=2. NaN at steps 3 (hybrid: G and the RTD head
skip too), 6 and 7 (SC only: tau is 4); a checkpoint after every step; two in a row stop the run
at step 7.
"""

import io
import json
from pathlib import Path

import pytest
import torch

from spactor_mega.parallel.testing import run_distributed
from spactor_mega.training.nonfinite import TEST_NAN_STEPS_ENV, NonFiniteStepsError
from tests.training.test_training import tiny_config

NAN_STEPS = (3, 6, 7)
LAYOUTS = {
    "megatron_dp2": {},
    "megatron_pp2": {"parallel__pipeline_model_parallel_size": 2},
    "deepspeed_zero2_dp2": {"train__engine": "deepspeed"},
}


def _config(work: Path, name: str, overrides: dict):
    cfg = tiny_config(work / name, train__save_interval=1, train__max_skipped_steps=2, **overrides)
    if cfg.train.engine == "deepspeed":
        cfg.deepspeed.zero_stage = 2
        cfg.deepspeed.config = str(work / "torch_adam.json")  # DeepSpeed's fused/CPU Adam need a JIT build
    return cfg


def _train_layouts(rank, world_size, work: str):
    import os

    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    os.environ[TEST_NAN_STEPS_ENV] = ",".join(map(str, NAN_STEPS))
    stopped = {}
    for name, overrides in LAYOUTS.items():
        try:
            train(_config(Path(work), name, overrides))
            stopped[name] = None
        except NonFiniteStepsError as e:
            stopped[name] = str(e)
        finally:
            destroy_parallel(destroy_process_group=False)
    return stopped


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("nonfinite")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    stopped = run_distributed(_train_layouts, 2, str(work), timeout=600)
    assert stopped[0] == stopped[1]  # every rank stopped, with the same message
    return work, stopped[0]


def _tensors(checkpoint: Path, scratch: Path) -> dict:
    """Every tensor of a checkpoint (weights, optimizer state; both engines' formats) and its LR
    schedules' state, by file and key path."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        elif torch.is_tensor(value) or isinstance(value, io.BytesIO) or "scheduler" in prefix:
            out[prefix] = value.getvalue() if isinstance(value, io.BytesIO) else value

    if (checkpoint / ".metadata").exists():  # Megatron's dist-checkpoint
        dcp_to_torch_save(checkpoint, scratch / f"{checkpoint.name}.pt")
        walk("dist", torch.load(scratch / f"{checkpoint.name}.pt", weights_only=False))
        walk("common", torch.load(checkpoint / "common.pt", weights_only=False))
    for file in sorted(checkpoint.rglob("*states.pt")):  # DeepSpeed's model and ZeRO partition files
        walk(str(file.relative_to(checkpoint)), torch.load(file, weights_only=False))
    assert any(torch.is_tensor(v) for v in out.values()), checkpoint
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_nan_step_changes_nothing_is_counted_and_too_many_stop_the_run(trained, name, tmp_path):
    work, stopped = trained
    save_dir = work / name / "ckpt"
    state = {step: _tensors(save_dir / f"iter_{step:07d}", tmp_path) for step in (2, 3, 4, 5, 6)}
    assert any("optim" in k for k in state[2])  # optimizer state is compared too
    assert _same(state[2], state[3])  # hybrid step 3 skipped: D, G, RTD head, both optimizers, both schedules
    assert not _same(state[3], state[4])  # a finite step updates
    assert _same(state[5], state[6])  # SC-only step 6 skipped
    assert not (save_dir / "iter_0000007").exists()

    assert stopped[name] == (
        f"stopped at step 7: 2 steps in a row had a non-finite loss or gradient norm and were skipped "
        f"(train.max_skipped_steps=2); resume from the last good checkpoint {save_dir / 'iter_0000006'}, "
        "with a lower optim.lr or other data")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / name / "tb"))
    events.Reload()
    skipped = [(e.step, e.value) for e in events.Scalars("train/skipped")]
    counted = [(e.step, e.value) for e in events.Scalars("train/skipped_steps")]
    assert skipped == [(s, float(s in NAN_STEPS)) for s in range(1, 8)]
    assert counted == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 2.0), (7, 3.0)]
