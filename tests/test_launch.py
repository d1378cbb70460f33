"""The launchers as a cluster runs them: launch/torchrun.sh as two nodes on loopback (train, stop,
resume), launch/slurm.sbatch's node and rank arithmetic with a stand-in srun and torchrun, and the
environment of launch/env.sh reaching torchrun (which hands its environment to the workers) and
DeepSpeed's multi-node runner (which forwards only its env file)."""

import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from spactor_mega.data.prepare import ensure_data
from spactor_mega.parallel.state import free_port
from spactor_mega.parallel.testing import run_distributed
from tests.training.test_training import _train, tiny_config

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin")


def _launch_two_nodes(preset: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """launch/torchrun.sh started twice, one process each, the same rendezvous endpoint (c10d numbers the nodes)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    nodes = [subprocess.Popen(["bash", "launch/torchrun.sh", "--config", str(preset), *args], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    done = []
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out))
    return done


def _tensorboard_losses(directory: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(directory)
    events.Reload()
    return [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def test_two_nodes_on_loopback_train_stop_and_resume(tmp_path):
    cfg = tiny_config(tmp_path / "nodes", train__steps=4, spactor__tau=3.0)
    ensure_data(cfg)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))

    first = _launch_two_nodes(preset, "--train.exit_interval", "2")
    assert [node.returncode for node in first] == [0, 0], first[0].stdout[-3000:] + first[1].stdout[-3000:]
    # c10d's rendezvous decides which node holds rank 0 (the one that prints)
    assert "[train] world 2 = TP 1 x PP 1 x DP 2" in first[0].stdout + first[1].stdout
    assert (Path(cfg.train.save_dir) / "iter_0000002").is_dir()
    second = _launch_two_nodes(preset)  # the launcher resumes by itself (--train.resume auto)
    assert [node.returncode for node in second] == [0, 0], second[0].stdout[-3000:] + second[1].stdout[-3000:]
    printed = second[0].stdout + second[1].stdout
    assert "resumed from" in printed and "at step 2" in printed

    # the same run on one machine, never stopped: the two nodes' losses, stop and resume included
    reference = run_distributed(_train, 2, tiny_config(tmp_path / "one_machine", train__steps=4, spactor__tau=3.0),
                                timeout=600)[0]["history"]
    assert _tensorboard_losses(cfg.logging.tensorboard_dir) == [np.float32(h["loss"]) for h in reference]


FAKE_SRUN = """#!/usr/bin/env bash
# srun with --ntasks-per-node=1: the command once per node, each with its SLURM_NODEID
while [[ "$1" == --* ]]; do echo "$1" >> "$RECORD.srun"; shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] && printf 'gpu07\\ngpu08\\n'
"""
FAKE_TORCHRUN = """#!/usr/bin/env bash
echo "$@" >> "$RECORD"
env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_)' | sort >> "$RECORD.env"
"""
LAUNCH_ENV = ["CUDA_DEVICE_MAX_CONNECTIONS=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "TORCH_NCCL_DUMP_ON_TIMEOUT=1",
              "TORCH_NCCL_TRACE_BUFFER_SIZE=2000"]


def _without_launch_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS" and not k.startswith("TORCH_NCCL_")}


def _fake_commands(folder: Path, **scripts: str) -> Path:
    folder.mkdir()
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


@pytest.mark.parametrize("gpus", ["4", None])
def test_slurm_script_starts_every_node_against_the_first_node(tmp_path, gpus):
    fake = _fake_commands(tmp_path / "bin", srun=FAKE_SRUN, scontrol=FAKE_SCONTROL, torchrun=FAKE_TORCHRUN)
    record = tmp_path / "torchrun.args"
    # sbatch sets SLURM_CPUS_PER_TASK from the script's #SBATCH --cpus-per-task
    env = {**_without_launch_env(os.environ), "PATH": f"{fake}:{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234", "SLURM_CPUS_PER_TASK": "64"}
    env.pop("MASTER_PORT", None)
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = gpus
    run = subprocess.run(["bash", "launch/slurm.sbatch", "--config", "configs/t5-xl.yaml", "--train.steps", "10"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = record.read_text().splitlines()
    assert calls == [
        f"--nnodes 2 --nproc-per-node {gpus or 8} --rdzv-backend c10d --rdzv-endpoint gpu07:29500 --rdzv-id 1234 "
        "--max-restarts 3 -m spactor_mega.cli train --train.resume auto --config configs/t5-xl.yaml --train.steps 10"
    ] * 2  # c10d's rendezvous numbers the nodes
    assert "#SBATCH --cpus-per-task=64" in (ROOT / "launch/slurm.sbatch").read_text().splitlines()
    assert "--cpus-per-task=64" in Path(f"{record}.srun").read_text().splitlines()  # the step asks for them
    assert Path(f"{record}.env").read_text().splitlines() == LAUNCH_ENV * 2


FAKE_DEEPSPEED = """#!/usr/bin/env bash
echo "$@" > "$RECORD"
env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_)' | sort > "$RECORD.env"
[[ -n "${DS_ENV_FILE:-}" ]] && cp "$DS_ENV_FILE" "$RECORD.ds_env"
exit 0
"""


@pytest.mark.parametrize("hostfile", [False, True])
def test_deepspeed_script_hands_the_launch_environment_to_every_node(tmp_path, hostfile):
    fake = _fake_commands(tmp_path / "bin", deepspeed=FAKE_DEEPSPEED)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("MY_VAR=kept\n\nTORCH_NCCL_TRACE_BUFFER_SIZE=500")  # no final newline
    record = tmp_path / "deepspeed.args"
    env = {**_without_launch_env(os.environ), "PATH": f"{fake}:{VENV_BIN}:{os.environ['PATH']}",
           "RECORD": str(record), "HOME": str(home), "TMPDIR": str(tmp_path), "CUDA_DEVICE_MAX_CONNECTIONS": "4",
           "GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""}
    if hostfile:
        env["HOSTFILE"] = str(tmp_path / "hosts")
    run = subprocess.run(["bash", "launch/deepspeed.sh", "--config", "configs/zero2-offload.yaml"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    launched = ["CUDA_DEVICE_MAX_CONNECTIONS=4"] + LAUNCH_ENV[1:]  # a value already set wins
    assert record.with_suffix(".args.env").read_text().splitlines() == launched
    forwarded = Path(f"{record}.ds_env")
    if hostfile:  # the user's env file first, then ours (DeepSpeed lets a later line win)
        assert forwarded.read_text().splitlines() == ["MY_VAR=kept", "TORCH_NCCL_TRACE_BUFFER_SIZE=500",
                                                      "CUDA_DEVICE_MAX_CONNECTIONS=4", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                                                      "TORCH_NCCL_TRACE_BUFFER_SIZE=2000",
                                                      "TORCH_NCCL_DUMP_ON_TIMEOUT=1"]
    else:  # one machine: the workers inherit the environment
        assert not forwarded.exists()
