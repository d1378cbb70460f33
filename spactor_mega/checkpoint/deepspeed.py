"""DeepSpeed checkpoints of the DeepSpeed engine, consolidated into full fp32 tensors.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/`` with one DeepSpeed checkpoint per engine
(``discriminator/``, and before tau ``generator_rtd/``) plus the same ``run.json`` and
``latest`` as :mod:`spactor_mega.checkpoint.megatron`. :func:`consolidated_state_dict` turns it
into one state dict keyed like our TP=1 modules (``discriminator.``, ``generator.``,
``rtd_head.`` prefixes): what ``spactor convert to-hf`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spactor_mega.checkpoint.megatron import CheckpointError, read_record

ENGINE_TAGS = ("discriminator", "generator_rtd")


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of every module the checkpoint holds (runs in one process, no GPU)."""
    path = Path(path)
    record = read_record(path)
    config = record.get("config", {})
    engine = config.get("train", {}).get("engine", "megatron")
    if engine != "deepspeed":
        raise CheckpointError(f"{path}: written by train.engine={engine}, not a DeepSpeed checkpoint")
    tp = int(record.get("tensor_model_parallel_size", 1))
    if tp != 1:
        raise CheckpointError(f"{path}: saved with TP={tp}; consolidating tensor-parallel DeepSpeed checkpoints is "
                              "not supported (train the DeepSpeed engine with TP=1, or use the Megatron engine for TP)")
    state: dict[str, torch.Tensor] = {}
    for tag in ENGINE_TAGS:
        if (path / tag).is_dir():
            state.update(_engine_state(path, tag))
    if not state:
        raise CheckpointError(f"{path}: no DeepSpeed engine checkpoint ({', '.join(ENGINE_TAGS)}) in it")
    return state


def _engine_state(path: Path, tag: str) -> dict[str, torch.Tensor]:
    if any((path / tag).glob("*optim_states.pt")):
        from spactor_mega.training.engines.deepspeed import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO 1-3 (and bf16): the fp32 master partitions of every DP rank, reassembled.
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    else:
        # ZeRO-0 in fp32: the module's own state dict is whole and fp32 already.
        files = sorted((path / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{path / tag}: no DeepSpeed model states in it; the checkpoint is incomplete")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
