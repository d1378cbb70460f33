"""Preemption and automatic restart, end to end through torchrun (2 processes, DP = 2, tiny models).

Faults come through the test-only hook of spactor_mega/training/preemption.py (inject_test_fault):
SPACTOR_TEST_SIGNAL_AT_STEP sends the last rank SIGTERM inside a step; SPACTOR_TEST_EXIT_AT_STEP
kills it there on the job's first attempt. Losses are read back from the runs' TensorBoard logs.
Nine torchrun launches (two restart) and one plain run: about 3 min on 2 CPU cores.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spactor_mega.parallel.state import free_port
from spactor_mega.parallel.testing import run_distributed
from tests.training.test_training import _train, tiny_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCHER = REPO / "launch" / "torchrun.sh"
STEPS, TAU = 8, 4  # steps 1-4 hybrid, 5-8 SC only


def _config_file(work: Path, engine: str, **overrides) -> Path:
    cfg = tiny_config(work, **{"train__steps": STEPS, "spactor__tau": TAU, "logging__log_interval": 1, **overrides})
    if engine == "deepspeed":
        cfg.train.engine = "deepspeed"
        cfg.deepspeed.config = str(work.parent / "torch_adam.json")  # torch's AdamW: no JIT build of DeepSpeed's
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _environment(**env: str) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "2", **env}


def _torchrun(config: Path, *flags: str, env: dict | None = None, launcher: str = "torchrun") -> str:
    """Runs `spactor train` on 2 processes; returns its output, asserting exit status 0."""
    if launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
        command += ["-m", "spactor_mega.cli", "train"]
    else:
        command = [str(LAUNCHER)]
    done = subprocess.run([*command, "--config", str(config), *flags], cwd=REPO, env=_environment(**(env or {})),
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _losses(tensorboard_dir: Path) -> dict[int, float]:
    """train/loss by step (float32, as TensorBoard keeps it); a later run's value replaces an earlier one."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    losses = {}
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            losses.update({event.step: v.simple_value for v in event.summary.value if v.tag == "train/loss"})
    return losses


def _latest(save_dir: Path) -> str:
    return (save_dir / "latest").read_text().strip()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("preemption")  # runs in subfolders: tokenizer, data and this file shared
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    return work


_REFERENCES: dict = {}


def _reference(work: Path, engine: str) -> dict[int, float]:
    """The uninterrupted run's losses (one launch per engine for the module)."""
    if engine not in _REFERENCES:
        _torchrun(_config_file(work / f"full_{engine}", engine))
        _REFERENCES[engine] = _losses(work / f"full_{engine}" / "tb")
    return _REFERENCES[engine]


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_sigterm_to_one_rank_mid_step_stops_all_at_that_step_and_resumes_exactly(work, engine):
    """SIGTERM reaches rank 1 only, inside step 3 (hybrid): both ranks finish step 3, save it and exit 0
    (torchrun's status 0 is every worker's); resumed, steps 4 (hybrid) to 8 (SC only) give the
    uninterrupted run's losses."""
    reference = _reference(work, engine)
    assert sorted(reference) == list(range(1, STEPS + 1))
    run = work / f"preempted_{engine}"
    config = _config_file(run, engine)
    output = _torchrun(config, env={"SPACTOR_TEST_SIGNAL_AT_STEP": "3"})
    assert "[train] SIGTERM received: stopped after step 3" in output, output[-3000:]
    assert "resume with --train.resume auto" in output
    assert _latest(run / "ckpt") == "iter_0000003"
    assert sorted(_losses(run / "tb")) == [1, 2, 3]

    _torchrun(config, "--train.resume", "auto")
    resumed = _losses(run / "tb")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == reference
    assert _latest(run / "ckpt") == f"iter_{STEPS:07d}"


def test_torchrun_restarts_a_dead_rank_from_the_last_checkpoint(work):
    """launch/torchrun.sh with MAX_RESTARTS=1: rank 1 dies inside step 5 of the first attempt; torchrun
    restarts both, they resume (--train.resume auto, the launcher's) from step 4's checkpoint and finish
    with the uninterrupted run's losses, and the job exits 0 by itself."""
    reference = _reference(work, "megatron")
    run = work / "restarted"
    output = _torchrun(_config_file(run, "megatron", train__save_interval=2), launcher="launch",
                       env={"SPACTOR_TEST_EXIT_AT_STEP": "5", "MAX_RESTARTS": "1"})
    assert f"resumed from {run / 'ckpt' / 'iter_0000004'} at step 4" in output, output[-3000:]
    losses = _losses(run / "tb")
    assert {step: losses[step] for step in range(5, STEPS + 1)} == {
        step: reference[step] for step in range(5, STEPS + 1)}
    assert _latest(run / "ckpt") == f"iter_{STEPS:07d}"


def test_a_deepspeed_job_killed_inside_a_save_restarts_from_the_previous_checkpoint(work):
    """launch/torchrun.sh with MAX_RESTARTS=1, DeepSpeed on 2 ranks: both are SIGKILLed between D's and
    G's shards of step 4's save on the first attempt (the store's test hook). The half-written
    ``iter_0000004.partial`` is ignored, torchrun restarts the job, it resumes from step 2's checkpoint by
    itself and ends with the uninterrupted run's losses."""
    reference = _reference(work, "deepspeed")
    run = work / "killed_in_save"
    output = _torchrun(_config_file(run, "deepspeed", train__save_interval=2), launcher="launch",
                       env={"SPACTOR_TEST_KILL_IN_SAVE": "between_shards@4", "MAX_RESTARTS": "1"})
    assert f"ignoring {run / 'ckpt' / 'iter_0000004.partial'}" in output, output[-3000:]
    assert f"resumed from {run / 'ckpt' / 'iter_0000002'} at step 2" in output
    assert _losses(run / "tb") == reference
    assert _latest(run / "ckpt") == f"iter_{STEPS:07d}"


def test_exit_duration_saves_and_stops_after_the_step_that_passes_it(work):
    """train.exit_duration_minutes: the first step that ends past it is saved and the run stops (one process)."""
    cfg = tiny_config(work / "duration", train__steps=STEPS, spactor__tau=TAU, train__exit_duration_minutes=1e-9)
    result = run_distributed(_train, 1, cfg, timeout=600)[0]
    assert [h["step"] for h in result["history"]] == [1]
    assert result["checkpoint"].endswith("iter_0000001") and _latest(work / "duration" / "ckpt") == "iter_0000001"


def test_launcher_hands_sigusr1_to_every_worker(work):
    """SIGUSR1 to launch/torchrun.sh (as SLURM's --signal sends it) once training runs: the workers get it
    (torchrun, which would die of it, does not), save the step they stop after and the job exits 0."""
    run = work / "launcher_signal"
    launcher = subprocess.Popen([str(LAUNCHER), "--config", str(_config_file(run, "megatron", train__steps=400))],
                                cwd=REPO, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    for line in launcher.stdout:
        output += line
        if line.startswith("[train] step 1 "):
            launcher.send_signal(signal.SIGUSR1)
            break
    output += launcher.stdout.read()
    assert launcher.wait(timeout=300) == 0, output[-4000:]
    stopped = re.search(r"\[train\] SIGUSR1 received: stopped after step (\d+)", output)
    assert stopped, output[-3000:]
    assert _latest(run / "ckpt") == f"iter_{int(stopped.group(1)):07d}"
