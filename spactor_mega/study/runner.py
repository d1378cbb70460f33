"""Runs a study's arms: each (arm, seed) is an ordinary `spactor train` of its own config,
resumed where it stopped (``train.resume auto``) and skipped once its last step is saved."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Optional

from spactor_mega.checkpoint.store import checkpoint_step, find_checkpoint
from spactor_mega.errors import UserError
from spactor_mega.parallel.state import destroy_parallel
from spactor_mega.study.plan import ArmRun, write_config
from spactor_mega.training.loop import train


def is_finished(run: ArmRun) -> bool:
    """The arm's checkpoint of its last step is complete (a damaged one is refused, naming it)."""
    checkpoint = find_checkpoint("auto", run.config.train.save_dir)
    return checkpoint is not None and (checkpoint_step(checkpoint) or 0) >= run.config.train.steps


def run_arms(runs: list[ArmRun], nproc_per_node: int = 1) -> tuple[int, Optional[ArmRun]]:
    """Trains every unfinished run in turn. Returns how many it trained and the run that stopped
    before its last step (preempted: a signal or ``train.exit_*``), after which nothing more runs."""
    trained = 0
    for i, run in enumerate(runs, 1):
        label = f"[study] ({i}/{len(runs)}) {run.arm.name} seed {run.seed}"
        config_file = write_config(run)
        if is_finished(run):
            print(f"{label}: finished, skipped ({run.folder})", file=sys.stderr, flush=True)
            continue
        print(f"{label}: training {run.config.train.steps} steps in {run.folder}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if nproc_per_node > 1:
            _launch(config_file, nproc_per_node)
        else:
            try:
                train(run.config)  # this process is the run's only rank, as `spactor train` alone
            finally:
                destroy_parallel()
        trained += 1
        if not is_finished(run):
            return trained, run
        print(f"{label}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return trained, None


def _launch(config_file, nproc_per_node: int) -> None:
    """One arm under torchrun on this node (any layout the config asks for); its output passes through."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "spactor_mega.cli", "train", "--config", str(config_file)]
    if subprocess.run(command).returncode != 0:
        raise UserError(f"the arm of {config_file} failed (its output is above); rerun the study to resume it")
