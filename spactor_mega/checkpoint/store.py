"""The checkpoint store both engines write into: ``iter_NNNNNNN/`` folders, ``run.json``, ``latest``.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/``: the engine's own files (Megatron's
``dist_checkpointing`` tensors, :mod:`spactor_mega.checkpoint.megatron`; DeepSpeed's per-engine
folders, :mod:`spactor_mega.checkpoint.deepspeed`) plus ``run.json``, the run's own record (step,
consumed samples, curriculum phase, layout, config), written last. ``latest`` names the newest
complete checkpoint; it is replaced atomically after ``run.json``, so a crash mid-save leaves the
previous checkpoint as the one ``--train.resume auto`` picks.

A record with ``"weights_only": true`` (an imported HF model, ``spactor convert from-hf``) holds
D's weights and nothing else: training starts from them with a fresh G and optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from spactor_mega.curriculum import Phase, phase_at
from spactor_mega.errors import UserError
from spactor_mega.plan.derived import uses_bf16

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


def make_record(cfg, step: int, vocab_size: int, **extra) -> dict:
    """A checkpoint's run.json: step, samples consumed, curriculum phase, resolved precision,
    layout, padded vocab, the config."""
    p = cfg.parallel
    return {
        "step": step, "consumed_samples": step * cfg.train.global_batch_size,
        "phase": phase_at(step, cfg.spactor.tau).name, "precision": "bf16" if uses_bf16(cfg) else "fp32",
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "vocab_size": vocab_size, "config": cfg.to_dict(), **extra,
    }


def recorded_phase(record: dict) -> Optional[str]:
    """The record's curriculum phase name; records written before the rename call it ``"stage"``."""
    return record.get("phase", record.get("stage"))


def recorded_engine(record: dict) -> str:
    """The ``train.engine`` that wrote the checkpoint (records without one are Megatron's)."""
    return (record.get("config") or {}).get("train", {}).get("engine", "megatron")


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
        if not (path / RUN_RECORD).is_file() and (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()  # a save dir: its latest checkpoint
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
                 "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                 "vocab_size")
_GENERATOR_FIELDS = ("depth_fraction", "d_ff", "num_heads")
_DEFAULTS = {"init": "megatron"}  # what a field added later meant in checkpoints written before it


def check_resumable(path: Path, record: dict, cfg, vocab_size: int, pipeline_layout: str) -> None:
    """Refuses, before anything is built, a checkpoint of another engine or model (naming the field)
    and one whose optimizer state cannot be resharded to this run's layout (Adafactor's is kept per
    (TP, PP) rank); model weights and AdamW state load under any TP/PP/DP layout. A weights-only
    checkpoint (``spactor convert from-hf``) is checked for D's shape alone: G and the optimizers
    start afresh from it."""
    saved = record.get("config", {})
    weights_only = bool(record.get("weights_only"))
    engine = recorded_engine(record)
    if not weights_only and engine != cfg.train.engine:
        raise CheckpointError(f"{path}: written by train.engine={engine}; resume it with that engine, "
                              f"not {cfg.train.engine}")
    hybrid = recorded_phase(record) == Phase.HYBRID.name and not weights_only
    sections = [("model", _MODEL_FIELDS)] + ([("generator", _GENERATOR_FIELDS)] if hybrid else [])
    if hybrid:  # model.init also sets G's tied-head scale (checkpoints from before it had "megatron")
        sections.append(("model", ("init",)))
    for section, names in sections:
        for name in names:
            theirs, ours = saved.get(section, {}).get(name, _DEFAULTS.get(name)), getattr(getattr(cfg, section), name)
            if theirs != ours:
                raise CheckpointError(f"{path}: written for {section}.{name}={theirs!r} but this run has "
                                      f"{section}.{name}={ours!r}; resume with the checkpoint's model config or start afresh")
    if record.get("vocab_size") != vocab_size:
        raise CheckpointError(
            f"{path}: its padded vocabulary has {record.get('vocab_size')} rows but this run pads to {vocab_size} "
            "(the tokenizer's rows rounded up to lcm(model.make_vocab_size_divisible_by, TP)); use a "
            "tensor-parallel size that divides model.make_vocab_size_divisible_by")
    if weights_only:
        return
    precision = "bf16" if uses_bf16(cfg) else "fp32"
    if record.get("precision", precision) != precision:  # records from before this field: not checked
        raise CheckpointError(f"{path}: its optimizer state was written by a {record['precision']} run but this run "
                              f"trains in {precision}; resume with train.precision={record['precision']}")
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


def strip_prefix(state: dict, prefix: str) -> dict:
    """``state`` with ``prefix`` taken off the keys that have it (checkpoint keys -> module names)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
