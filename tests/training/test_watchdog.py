"""The hang watchdog: a step held up on one rank makes every rank print its own stacks, led by its rank."""

import io
import os
import sys

from spactor_mega.parallel.testing import run_distributed
from spactor_mega.training.watchdog import FLIGHT_RECORDER_DUMP_ENV, TEST_SLEEP_ENV, HangWatchdog, point_flight_recorder_dump
from tests.training.test_training import tiny_config


def _train_capturing_stderr(rank, world_size, cfg, sleep_at):
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    os.environ[TEST_SLEEP_ENV] = sleep_at
    sys.stderr = captured = io.StringIO()
    try:
        result = train(cfg)
    finally:
        destroy_parallel()
        sys.stderr = sys.__stderr__
    return {"stderr": captured.getvalue(), "steps": [h["step"] for h in result.history]}


def test_a_step_held_up_on_one_rank_prints_every_ranks_stack(tmp_path):
    cfg = tiny_config(tmp_path / "run", train__steps=7, train__hang_factor=10.0)
    ranks = run_distributed(_train_capturing_stderr, 2, cfg, "6:1", timeout=600)
    for rank, out in enumerate(ranks):
        assert out["steps"] == list(range(1, 8))  # the run goes on after the printout
        # (a busy machine may stretch another step past the factor too: only step 6 is certain)
        printed = [line for line in out["stderr"].splitlines() if "watchdog: step 6 " in line]
        assert len(printed) == 1, out["stderr"]
        assert printed[0].startswith(f"[rank {rank}] watchdog: step 6 has run ")
        assert "more than train.hang_factor=10 x the median step" in printed[0]
        stack = [line for line in out["stderr"].splitlines() if line.startswith(f"[rank {rank}] ")]
        assert f"[rank {rank}] Thread MainThread (most recent call last):" in stack
        assert any("in train" in line and "loop.py" in line for line in stack)
        assert not any(line.startswith(f"[rank {1 - rank}]") for line in out["stderr"].splitlines())
    # the held-up rank shows where it is held; its peer waits inside the step, past the hook
    assert any("in start_step" in line for line in ranks[1]["stderr"].splitlines())
    assert not any("in start_step" in line for line in ranks[0]["stderr"].splitlines())


def test_off_by_default_and_armed_only_after_a_few_steps():
    watchdog = HangWatchdog(0.0, rank=0, stream=io.StringIO())
    watchdog.durations = [1.0] * 10
    assert watchdog.threshold is None
    watchdog = HangWatchdog(4.0, rank=0, stream=io.StringIO())
    watchdog.durations = [1.0, 2.0]
    assert watchdog.threshold is None
    watchdog.durations = [1.0, 2.0, 30.0]
    assert watchdog.threshold == 8.0  # the median, not the mean: one slow step does not move it


def test_flight_recorder_dumps_go_to_the_run_folder_on_cuda(tmp_path, monkeypatch):
    for name in FLIGHT_RECORDER_DUMP_ENV:  # set, then unset: monkeypatch restores what the function sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    save_dir = tmp_path / "run" / "checkpoints"
    assert point_flight_recorder_dump(str(save_dir), cuda=False) is None  # gloo has no flight recorder
    assert not (tmp_path / "run").exists() and not any(os.environ.get(n) for n in FLIGHT_RECORDER_DUMP_ENV)
    prefix = point_flight_recorder_dump(str(save_dir), cuda=True)
    assert prefix == os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "run" / "nccl_trace" / "rank_")
    assert (tmp_path / "run" / "nccl_trace").is_dir()  # torch creates no folder for it
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", "/scratch/mine_")  # the user's choice wins
    assert point_flight_recorder_dump(str(save_dir), cuda=True) == "/scratch/mine_"
