"""Megatron ``dist_checkpointing`` checkpoints: layout-independent, complete, or not there.

The engine's part of a checkpoint (:mod:`spactor_mega.checkpoint.store` holds the rest: the
``iter_NNNNNNN`` folder, ``run.json``, ``latest``) is written by ``dist_checkpointing.save``:
sharded tensors with global names and shapes, so a run saved under one TP/PP layout loads under
another, and a reader of the weights alone needs no model (:func:`read_full_tensors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from spactor_mega.checkpoint.store import (
    CheckpointError,
    checkpoint_dir,
    commit_checkpoint,
    prepare_checkpoint_dir,
    save_fault_point,
    strip_prefix,
)
from spactor_mega.parallel.state import single_process_parallel


def save_checkpoint(save_dir: str | Path, step: int, sharded_state: dict, record: dict, tokenizer_file: Optional[Path]) -> Path:
    """A complete checkpoint, written now (collective)."""
    return CheckpointWriter(asynchronous=False).save(save_dir, step, sharded_state, record, tokenizer_file)


class CheckpointWriter:
    """Writes the checkpoints of one run, synchronously or, with ``asynchronous``, through Megatron's
    async dist-checkpointing: ``save`` returns once the shards are planned and handed to a forked
    writer process, and training goes on while it writes them. The checkpoint is published
    (``run.json``, the rename, ``latest``: :func:`~spactor_mega.checkpoint.store.commit_checkpoint`)
    by a finalize step that Megatron runs only once every rank's writer has finished, in
    :meth:`complete` (every step) or before the next save. Both ways run the same dist-checkpoint
    request (Megatron's own synchronous save is that request run in place), so they write the same
    bytes.

    The writer is forked (Megatron's ``TemporalAsyncCaller``), not the persistent spawned worker:
    on the CPU Megatron's copy of the tensors to host memory is no copy, and a fork is what gives the
    writer the tensors as they were at the save while training changes them (copy-on-write)."""

    def __init__(self, asynchronous: bool):
        self.calls = AsyncCallsQueue(persistent=False) if asynchronous else None

    def save(self, save_dir: str | Path, step: int, sharded_state: dict, record: dict,
             tokenizer_file: Optional[Path]) -> Path:
        """Writes (or starts writing) ``save_dir/iter_NNNNNNN``; returns that path (collective)."""
        self.complete(wait=True)
        path = prepare_checkpoint_dir(save_dir, step)
        request = dist_checkpointing.save(sharded_state, str(path), async_sharded_save=True)
        # Megatron's finalize steps write the dist-checkpoint's metadata (what makes it loadable)
        # after every rank's shards; ours publish it after that.
        request.finalize_fns.insert(0, lambda: save_fault_point("between_shards", step))
        request.finalize_fns.append(lambda: commit_checkpoint(save_dir, path, record, tokenizer_file))
        if self.calls is None:
            request.execute_sync()
        else:
            self.calls.schedule_async_request(request)
        return checkpoint_dir(save_dir, step)

    def complete(self, wait: bool) -> None:
        """Publishes the saves every rank has finished writing; with ``wait``, waits for all (collective)."""
        if self.calls is not None:
            self.calls.maybe_finalize_async_calls(blocking=wait)


def load_checkpoint(path: Path, sharded_state: dict) -> dict:
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


def load_model_weights(path: Path, discriminator) -> None:
    """Loads D's weights alone (a weights-only checkpoint) into ``discriminator`` (any layout)."""
    state = load_checkpoint(path, {"discriminator": discriminator.sharded_state_dict(prefix="discriminator.")})
    discriminator.load_state_dict(strip_prefix(state["discriminator"], "discriminator."), strict=True)


def read_full_tensors(path: Path, prefix: str) -> dict:
    """``{name: full tensor}`` of every checkpoint tensor whose global key starts with ``prefix``
    (prefix stripped; names as in the TP = 1 module's state dict), whatever TP/PP/DP layout wrote
    it: read by global name and shape from the checkpoint's metadata, nothing else (no model, no
    optimizer state). Call with a process group (one process is enough)."""
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


def read_weights(path: Path, record: dict, modules: tuple[str, ...]) -> dict[str, dict]:
    """The Megatron engine's checkpoint reader (its ``read_weights`` in :data:`spactor_mega.plan.engines.ENGINES`):
    ``{module: {name: full tensor}}`` for ``modules`` (of discriminator, generator, rtd_head), in one
    process, whatever layout wrote them."""
    with single_process_parallel():  # dist_checkpointing's reader wants a process group
        return {module: read_full_tensors(path, f"{module}.") for module in modules}
