"""Checkpoints that are never half-visible: a process killed at each point of a save, asynchronous
saves (bitwise those of a synchronous one), retention, refused save dirs, damaged checkpoints.

The kills go through the store's test-only hook (``SPACTOR_TEST_KILL_IN_SAVE=<point>@<step>``:
SIGKILL at that point of that step's save); Megatron is real throughout."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from spactor_mega.checkpoint.megatron import read_full_tensors
from spactor_mega.checkpoint.store import (
    KILL_IN_SAVE,
    LATEST,
    SAVE_POINTS,
    CheckpointError,
    apply_retention,
    check_save_dir,
    find_checkpoint,
)
from spactor_mega.config import ConfigError
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.parallel.testing import DistributedWorkerError, run_distributed
from spactor_mega.plan.validate import validate
from tests.training.test_training import tiny_config

STEPS, SAVE_INTERVAL = 6, 2  # tau = 4: the resumed runs cross it


def _train(rank, world_size, cfg, kill=None, log=None):
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    if kill:
        os.environ[KILL_IN_SAVE] = kill
    if log:  # what the run prints, kept when it is killed
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
    try:
        result = train(cfg)
    finally:
        destroy_parallel()
    return [(h["step"], h["loss"]) for h in result.history]


def run(cfg, kill=None, log=None):
    return run_distributed(_train, 1, cfg, kill=kill, log=log and str(log), timeout=300)[0]


def config(work: Path, **overrides):
    return tiny_config(work, **{"train__steps": STEPS, "train__save_interval": SAVE_INTERVAL, **overrides})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_safety") / "run"


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted run, synchronous saves at steps 2, 4, 6: its losses and save dir."""
    cfg = config(work / "reference")
    return run(cfg), Path(cfg.train.save_dir)


def _iter_dirs(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_"))


@pytest.fixture(scope="module")
def killed(work):
    """SIGKILL at each point of the save at step 4, one run after another (each after the first
    resumes with ``auto``, trains steps 3 and 4 and dies in that save): per point, what the run
    printed, what ``latest`` named and which iter folders were left."""
    save_dir = Path(config(work / "kill").train.save_dir)
    work.mkdir(parents=True, exist_ok=True)
    seen, resume = {}, None
    for point in SAVE_POINTS:
        with pytest.raises(DistributedWorkerError, match=r"exited with code\(s\) \[-9\]"):
            capture = work / f"kill_{point}.log"
            run(config(work / "kill", train__resume=resume), kill=f"{point}@4", log=capture)
        seen[point] = (capture.read_text(), (save_dir / LATEST).read_text().strip(), _iter_dirs(save_dir))
        resume = "auto"
    return save_dir, seen


def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_latest(killed):
    save_dir, seen = killed
    for i, (point, (out, latest, dirs)) in enumerate(seen.items()):
        assert latest == "iter_0000002", point
        published = point == "before_latest"  # renamed into place, but `latest` was never replaced
        assert dirs == ["iter_0000002", "iter_0000004" if published else "iter_0000004.partial"], point
        if i:  # resumed from the previous complete checkpoint, the interrupted save reported
            assert f"resumed from {save_dir / 'iter_0000002'} at step 2" in out
            assert f"ignoring {save_dir / 'iter_0000004.partial'}: a save that did not complete" in out


@pytest.fixture(scope="module")
def resumed_async(work, killed):
    """After the kills, ``--train.resume auto`` to the end, now saving every step asynchronously
    (each save waits for the one before) and keeping the newest 2 plus the multiples of 4."""
    cfg = config(work / "kill", train__resume="auto", train__async_save=True, train__save_interval=1,
                 train__keep_last_checkpoints=2, train__keep_every=4)
    return run(cfg), Path(cfg.train.save_dir)


def _all_tensors(path: Path) -> dict:
    with single_process_parallel():
        return read_full_tensors(path, "")


def test_after_the_kills_resume_gives_the_uninterrupted_losses_and_async_checkpoints_are_bitwise(
        reference, resumed_async):
    (losses, sync_dir), (resumed, async_dir) = reference, resumed_async
    assert resumed == losses[2:]
    assert _iter_dirs(async_dir) == ["iter_0000004", "iter_0000005", "iter_0000006"]  # retention, no partial left
    assert (async_dir / LATEST).read_text().strip() == "iter_0000006"
    for name in ("iter_0000004", "iter_0000006"):  # written asynchronously vs synchronously
        theirs, ours = _all_tensors(sync_dir / name), _all_tensors(async_dir / name)
        assert sorted(theirs) == sorted(ours) and any("optimizer" in k for k in ours)
        for key, tensor in theirs.items():
            assert torch.equal(tensor, ours[key]), (name, key)


def test_a_resume_from_an_asynchronous_checkpoint_is_exact(work, reference, resumed_async):
    losses, (_, async_dir) = reference[0], resumed_async
    assert run(config(work / "from_async", train__resume=str(async_dir / "iter_0000004"))) == losses[4:]


def test_retention_deletes_only_complete_earlier_checkpoints(tmp_path):
    def make(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "run.json").write_text("{}")

    for step in range(1, 10):
        make(f"iter_{step:07d}")
    make("iter_0000010.partial", complete=False)  # being written or interrupted: never touched
    make("iter_0000012")  # a later step left by an interrupted earlier run: never touched
    make("iter_0000003.partial", complete=False)
    deleted = apply_retention(tmp_path, 9, keep_last=3, keep_every=4)
    assert sorted(p.name for p in deleted) == [f"iter_{s:07d}" for s in (1, 2, 3, 5, 6)]
    assert _iter_dirs(tmp_path) == ["iter_0000003.partial", "iter_0000004", "iter_0000007", "iter_0000008",
                                    "iter_0000009", "iter_0000010.partial", "iter_0000012"]
    assert apply_retention(tmp_path, 9, keep_last=0, keep_every=None) == []  # 0: keep all
    assert [p.name for p in apply_retention(tmp_path, 9, keep_last=1, keep_every=None)] == [
        "iter_0000004", "iter_0000007", "iter_0000008"]  # the one just written stays


def test_a_save_dir_that_cannot_hold_a_checkpoint_is_refused_before_training(work, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = config(work / "unwritable")
    cfg.train.save_dir = str(blocker / "checkpoints")
    with pytest.raises(DistributedWorkerError, match=rf"ConfigError: train\.save_dir={blocker}/checkpoints: not "
                                                     r"writable \(Not a directory\); pick a directory"):
        run(cfg)
    with pytest.raises(ConfigError, match=rf"train\.save_dir={tmp_path}: [\d.]+ GB free but one checkpoint needs "
                                          r"about 1000000000\.00 GB; free space there or pick another"):
        check_save_dir(tmp_path, 1e18)
    check_save_dir(tmp_path, 1e6)


def test_a_damaged_checkpoint_is_refused_naming_the_file(work, reference, capsys):
    """A truncated shard or a missing file in the latest checkpoint: ``auto`` refuses it in one line
    naming the file; ``auto-previous`` resumes from the newest complete checkpoint before it."""
    _, source = reference
    save_dir = work / "damaged"
    shutil.copytree(source, save_dir)
    latest = save_dir / "iter_0000006"
    files = json.loads((latest / "run.json").read_text())["files"]
    shard = latest / next(name for name in files if name.endswith(".distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as refused:
        find_checkpoint("auto", save_dir)
    message = str(refused.value)
    assert message.startswith(f"{shard}: {files[shard.name] - 100} bytes but {files[shard.name]} were written")
    assert "--train.resume auto-previous" in message and "\n" not in message
    capsys.readouterr()
    assert find_checkpoint("auto-previous", save_dir) == save_dir / "iter_0000004"
    assert f"{shard}: " in capsys.readouterr().out
    (save_dir / "iter_0000004" / "common.pt").unlink()  # damaged too: back to step 2
    assert find_checkpoint("auto-previous", save_dir) == save_dir / "iter_0000002"
    with pytest.raises(CheckpointError, match=rf"^{save_dir / 'iter_0000004' / 'common.pt'}: missing"):
        find_checkpoint(str(save_dir / "iter_0000004"), save_dir)


@pytest.mark.parametrize("overrides, message", [
    ({"train__keep_last_checkpoints": -1}, r"train\.keep_last_checkpoints must be >= 0 \(0: keep every checkpoint\)"),
    ({"train__keep_every": 0}, r"train\.keep_every must be positive"),
    ({"train__async_save": True, "train__engine": "deepspeed"},
     r"train\.async_save is a Megatron engine setting: the DeepSpeed engine writes its checkpoints synchronously"),
])
def test_checkpoint_settings_are_validated_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(tmp_path, **overrides))
