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

    path = checkpoint_dir(save_dir, step)
    if _rank() == 0:
        if path.exists():
            shutil.rmtree(path)  # an incomplete earlier attempt at this step
        path.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state, str(path))
    _barrier()
    if _rank() == 0:
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, path / "spiece.model")
        (path / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str))
        tmp = Path(save_dir) / f".{LATEST}.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, Path(save_dir) / LATEST)
    _barrier()
    return path


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


# The fields that fix the parameters' shapes (and what they mean): a checkpoint written with
# other values is another model. The generator's only matter while it is in the checkpoint.
_MODEL_FIELDS = ("d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")
_GENERATOR_FIELDS = ("depth_fraction", "d_ff", "num_heads")


def check_resumable(path: Path, record: dict, cfg, vocab_size: int, pipeline_layout: str) -> None:
    """Refuses, before anything is built, a checkpoint of another model (naming the field) and
    one whose optimizer state cannot be resharded to this run's layout (Adafactor's is kept per
    (TP, PP) rank); model weights and AdamW state load under any TP/PP/DP layout."""
    saved = record.get("config", {})
    sections = [("model", _MODEL_FIELDS)] + ([("generator", _GENERATOR_FIELDS)] if record.get("stage") == "HYBRID" else [])
    for section, names in sections:
        for name in names:
            theirs, ours = saved.get(section, {}).get(name), getattr(getattr(cfg, section), name)
            if theirs != ours:
                raise CheckpointError(f"{path}: written for {section}.{name}={theirs!r} but this run has "
                                      f"{section}.{name}={ours!r}; resume with the checkpoint's model config or start afresh")
    if record.get("vocab_size") != vocab_size:
        raise CheckpointError(
            f"{path}: its padded vocabulary has {record.get('vocab_size')} rows but this run pads to {vocab_size} "
            "(the tokenizer's vocabulary rounded up to model.make_vocab_size_divisible_by x TP); choose "
            "model.make_vocab_size_divisible_by so that both agree")
    theirs = saved.get("optim", {}).get("optimizer")
    if theirs != cfg.optim.optimizer:
        raise CheckpointError(f"{path}: written with optim.optimizer={theirs!r} but this run has "
                              f"optim.optimizer={cfg.optim.optimizer!r}; resume with the same optimizer")
    if cfg.optim.optimizer == "adafactor":
        p = cfg.parallel
        then = (record.get("tensor_model_parallel_size"), record.get("pipeline_model_parallel_size"),
                record.get("pipeline_layout"))
        now = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, pipeline_layout)
        if then != now:
            raise CheckpointError(
                f"{path}: Adafactor state is kept per (TP, PP) rank and was written under TP={then[0]}, PP={then[1]}, "
                f"layout {then[2]}; resume with that layout (this run: TP={now[0]}, PP={now[1]}, layout {now[2]})")


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
