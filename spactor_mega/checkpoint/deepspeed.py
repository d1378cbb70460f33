"""DeepSpeed checkpoints of the DeepSpeed engine, consolidated into full fp32 tensors.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/`` with one DeepSpeed checkpoint per engine
(``discriminator/``, and before tau ``generator_rtd/``) in the store's folder, beside its
``run.json`` (:mod:`spactor_mega.checkpoint.store`). :func:`consolidated_state_dict` turns it
into one state dict keyed like our TP=1 modules (``discriminator.``, ``generator.``,
``rtd_head.`` prefixes); :func:`read_weights` splits it by module: what ``spactor convert to-hf`` reads.

Tensor parallelism: DeepSpeed writes one set of files per model-parallel (TP) rank
(``*mp_rank_XX_*``), each holding that rank's shards. At save time the engine records, per
TP-split parameter, Megatron's ``partition_dim`` and ``partition_stride``
(:func:`write_tp_layout`); consolidation reassembles each TP rank's fp32 weights with DeepSpeed's
``zero_to_fp32``, merges the split ones by that record and takes the replicated ones from TP rank 0.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from spactor_mega.checkpoint.store import CheckpointError, read_record, recorded_engine
from spactor_mega.parallel.cpu_compat import import_deepspeed
from spactor_mega.parallel.tensor_shards import merge_tp_shards, tp_attributes

ENGINE_TAGS = ("discriminator", "generator_rtd")
TP_LAYOUT_FILE = "tensor_parallel.json"
_MODEL_STATES = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def write_tp_layout(folder: Path, module: torch.nn.Module, tp: int) -> None:
    """``folder/tensor_parallel.json``: how each TP-split parameter of ``module`` (named as in
    DeepSpeed's state dicts) merges from its ``tp`` shards."""
    split = {}
    for name, p in module.named_parameters():
        is_tp, dim, stride = tp_attributes(p)
        if is_tp:
            split[name] = {"partition_dim": dim, "partition_stride": stride}
    (folder / TP_LAYOUT_FILE).write_text(json.dumps({"tensor_model_parallel_size": tp, "split": split}, indent=1))


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of every module the checkpoint holds (runs in one process, no GPU)."""
    path = Path(path)
    engine = recorded_engine(read_record(path))
    if engine != "deepspeed":
        raise CheckpointError(f"{path}: written by train.engine={engine}, not a DeepSpeed checkpoint")
    state: dict[str, torch.Tensor] = {}
    for tag in ENGINE_TAGS:
        if (path / tag).is_dir():
            state.update(_engine_state(path / tag))
    if not state:
        raise CheckpointError(f"{path}: no DeepSpeed engine checkpoint ({', '.join(ENGINE_TAGS)}) in it")
    return state


def read_weights(path: Path, record: dict, modules: tuple[str, ...]) -> dict[str, dict]:
    """The DeepSpeed engine's checkpoint reader (its ``read_weights`` in :data:`spactor_mega.plan.engines.ENGINES`):
    ``{module: {name: full fp32 tensor}}`` for ``modules`` (of discriminator, generator, rtd_head)."""
    full = consolidated_state_dict(path)
    out = {}
    for module in modules:
        prefix = f"{module}."
        out[module] = {k[len(prefix):]: full.pop(k) for k in [k for k in full if k.startswith(prefix)]}
    return out


def _engine_state(folder: Path) -> dict[str, torch.Tensor]:
    ranks = sorted({int(m.group(1)) for f in folder.iterdir() if (m := _MODEL_STATES.search(f.name))})
    if ranks != list(range(len(ranks))) or not ranks:
        raise CheckpointError(f"{folder}: DeepSpeed model states of TP ranks {ranks} (need 0..N-1); "
                              "the checkpoint is incomplete")
    if len(ranks) == 1 and not (folder / TP_LAYOUT_FILE).is_file():
        return _tp_rank_state(folder, 0)
    split = _read_tp_layout(folder, len(ranks))
    shards = [_tp_rank_state(folder, rank) for rank in ranks]
    missing = sorted(set(split) - set(shards[0]))
    if missing:
        raise CheckpointError(f"{folder}/{TP_LAYOUT_FILE}: names {missing[0]}, which the DeepSpeed states "
                              "lack; the checkpoint is inconsistent")
    return {name: merge_tp_shards([s[name] for s in shards], *split[name]) if name in split else tensor
            for name, tensor in shards[0].items()}


def _tp_rank_state(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's full-over-DP fp32 tensors (its TP shards)."""
    files = f"*mp_rank_{rank:02d}_*_states.pt"
    if any(folder.glob(f"*mp_rank_{rank:02d}_optim_states.pt")):
        # DeepSpeed is imported here, not at module top: import_deepspeed must pick its accelerator first.
        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        # ZeRO 1-3 (and bf16): the fp32 master partitions of every DP rank, reassembled. zero_to_fp32
        # reads every rank's files in a folder as one model-parallel rank, so it gets this rank's alone.
        with tempfile.TemporaryDirectory() as staging:
            (Path(staging) / folder.name).mkdir()
            for f in folder.glob(files):
                (Path(staging) / folder.name / f.name).symlink_to(f.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(staging, tag=folder.name)
    else:
        # ZeRO-0 in fp32: the module's own state dict is whole over DP and fp32 already.
        state = torch.load(folder / f"mp_rank_{rank:02d}_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}


def _read_tp_layout(folder: Path, tp: int) -> dict[str, tuple[int, int]]:
    """``{name: (partition_dim, partition_stride)}`` of the TP-split parameters, as saved."""
    file = folder / TP_LAYOUT_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing, so the {tp} TP shards cannot be merged; the checkpoint was written "
                              "before TP layouts were recorded or is incomplete")
    layout = json.loads(file.read_text())
    if layout.get("tensor_model_parallel_size") != tp:
        raise CheckpointError(f"{file}: records tensor_model_parallel_size={layout.get('tensor_model_parallel_size')} "
                              f"but the folder holds {tp} TP ranks' states; the checkpoint is inconsistent")
    return {name: (int(v["partition_dim"]), int(v["partition_stride"])) for name, v in layout["split"].items()}
