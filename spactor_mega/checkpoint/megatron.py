"""Megatron ``dist_checkpointing`` checkpoints: layout-independent, complete, or not there.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/`` written by ``dist_checkpointing.save`` (sharded
tensors, so a run saved under one TP/PP layout loads under another) plus ``run.json``, the
run's own record (step, consumed samples, stage, layout, config), written last. ``latest``
names the newest complete checkpoint; it is replaced atomically after ``run.json``, so a
crash mid-save leaves the previous checkpoint as the one ``--train.resume auto`` picks.

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


def make_record(cfg, step: int, vocab_size: int, **extra) -> dict:
    """A checkpoint's run.json: step, samples consumed, stage, layout, padded vocab, the config."""
    from spactor_mega.training.schedule import stage_at

    p = cfg.parallel
    return {
        "step": step, "consumed_samples": step * cfg.train.global_batch_size,
        "stage": stage_at(step, cfg.spactor.tau).name,
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "vocab_size": vocab_size, "config": cfg.to_dict(), **extra,
    }


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


def check_resumable(path: Path, record: dict, cfg, vocab_size: int, pipeline_layout: str) -> None:
    """Refuses, before anything is built, a checkpoint of another engine or model (naming the field)
    and one whose optimizer state cannot be resharded to this run's layout (Adafactor's is kept per
    (TP, PP) rank); model weights and AdamW state load under any TP/PP/DP layout. A weights-only
    checkpoint (``spactor convert from-hf``) is checked for D's shape alone: G and the optimizers
    start afresh from it."""
    saved = record.get("config", {})
    weights_only = bool(record.get("weights_only"))
    engine = saved.get("train", {}).get("engine", "megatron")
    if not weights_only and engine != cfg.train.engine:
        raise CheckpointError(f"{path}: written by train.engine={engine}; resume it with that engine, "
                              f"not {cfg.train.engine}")
    hybrid = record.get("stage") == "HYBRID" and not weights_only
    sections = [("model", _MODEL_FIELDS)] + ([("generator", _GENERATOR_FIELDS)] if hybrid else [])
    for section, names in sections:
        for name in names:
            theirs, ours = saved.get(section, {}).get(name), getattr(getattr(cfg, section), name)
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
        raise CheckpointError(
            f"{path}: cannot load into this model ({_first_line(e)}); check that the model config matches the "
            "checkpoint's run.json"
        ) from None


def _first_line(error: Exception) -> str:
    """The first line of an exception's message (dist_checkpointing's run to pages), or its type."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def strip_prefix(state: dict, prefix: str) -> dict:
    """``state`` with ``prefix`` taken off the keys that have it (checkpoint keys -> module names)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_model_weights(path: Path, discriminator) -> None:
    """Loads D's weights alone (a weights-only checkpoint) into ``discriminator`` (any layout)."""
    state = load_checkpoint(path, {"discriminator": discriminator.sharded_state_dict(prefix="discriminator.")})
    discriminator.load_state_dict(strip_prefix(state["discriminator"], "discriminator."), strict=True)


def read_full_tensors(path: Path, prefix: str) -> dict:
    """``{name: full tensor}`` of every checkpoint tensor whose global key starts with ``prefix``
    (prefix stripped; names as in the TP = 1 module's state dict), whatever TP/PP/DP layout wrote
    it: read by global name and shape from the checkpoint's metadata, nothing else (no model, no
    optimizer state). Call with a process group (one process is enough)."""
    from megatron.core import dist_checkpointing

    try:
        wanted = {k: v for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items() if k.startswith(prefix)}
        # Every process reads whole tensors, so shards are deliberately "accessed" more than once.
        loaded = dist_checkpointing.load(wanted, str(path), validate_access_integrity=False)
    except Exception as e:  # dist_checkpointing raises CheckpointingException and others
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({_first_line(e)})") from None
    keys = list(wanted)
    del wanted  # its ShardedTensors hold the loaded tensors too: keep one reference, in `loaded`
    out = {}
    for key in keys:  # `loaded` also holds the checkpoint's common (non-tensor) state
        name, tensor = key[len(prefix):], loaded.pop(key)
        stack, sep, rest = name.partition(".layers.")
        if sep and not rest.split(".", 1)[0].isdigit():
            # Megatron saves a TransformerBlock's layers stacked on a leading axis (global layer index).
            for i, layer in enumerate(tensor.unbind(0)):
                out[f"{stack}.layers.{i}.{rest}"] = layer.clone()  # own storage: freed as each is mapped
            del layer
        else:
            out[name] = tensor
        del tensor
    return out
