"""Megatron ``dist_checkpointing`` checkpoints: layout-independent, complete, or not there.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/`` written by ``dist_checkpointing.save`` (sharded
tensors, so a run saved under one TP/PP layout loads under another) plus ``run.json``, the
run's own record (step, consumed samples, stage, layout, config), written last. ``latest``
names the newest complete checkpoint; it is replaced atomically after ``run.json``, so a
crash mid-save leaves the previous checkpoint as the one ``--train.resume auto`` picks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from spactor_mega.errors import UserError

RUN_RECORD = "run.json"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded here; the message names it and what to do."""


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(save_dir: str | Path, step: int, sharded_state: dict, record: dict, tokenizer_file: Optional[Path]) -> Path:
    from megatron.core import dist_checkpointing

    path = prepare_checkpoint_dir(save_dir, step)
    dist_checkpointing.save(sharded_state, str(path))
    commit_checkpoint(save_dir, path, record, tokenizer_file)
    return path


def prepare_checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    """An empty ``iter_NNNNNNN`` directory for every rank to write into (collective)."""
    path = checkpoint_dir(save_dir, step)
    if _rank() == 0:
        if path.exists():
            shutil.rmtree(path)  # an incomplete earlier attempt at this step
        path.mkdir(parents=True)
    _barrier()
    return path


def commit_checkpoint(save_dir: str | Path, path: Path, record: dict, tokenizer_file: Optional[Path]) -> None:
    """After every rank wrote its part (collective): tokenizer, run.json, then ``latest``."""
    _barrier()
    if _rank() == 0:
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, path / "spiece.model")
        (path / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str))
        tmp = Path(save_dir) / f".{LATEST}.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, Path(save_dir) / LATEST)
    _barrier()


def read_record(path: str | Path) -> dict:
    path = Path(path)
    record = path / RUN_RECORD
    if not record.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {RUN_RECORD}); pick another or start afresh")
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{record}: corrupt ({e.msg} at line {e.lineno}); pick another checkpoint") from None


def find_checkpoint(resume: Optional[str], save_dir: str | Path) -> Optional[Path]:
    """``auto``: the latest complete checkpoint under save_dir, or None; else the path given."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        read_record(path)
        return path
    latest = Path(save_dir) / LATEST
    if not latest.is_file():
        return None
    path = Path(save_dir) / latest.read_text().strip()
    read_record(path)
    return path


def load_checkpoint(path: Path, sharded_state: dict) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded_state, str(path))
    except Exception as e:  # dist_checkpointing raises CheckpointingException and others
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot load into this model ({first[:300]}); check that the model config matches the "
            "checkpoint's run.json"
        ) from None
