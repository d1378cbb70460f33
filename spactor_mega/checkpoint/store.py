"""The checkpoint store both engines write into: ``iter_NNNNNNN/`` folders, ``run.json``, ``latest``.

A checkpoint is ``SAVE_DIR/iter_NNNNNNN/``: the engine's own files (Megatron's
``dist_checkpointing`` tensors, :mod:`spactor_mega.checkpoint.megatron`; DeepSpeed's per-engine
folders, :mod:`spactor_mega.checkpoint.deepspeed`) plus ``run.json``, the run's own record (step,
consumed samples, curriculum phase, layout, config, and the size of every file of the checkpoint),
written last. Every rank writes into ``iter_NNNNNNN.partial/``; once all have written, rank 0
writes ``run.json``, renames the folder to ``iter_NNNNNNN`` and then replaces ``latest`` (the
newest complete checkpoint) atomically. A process killed at any moment of a save therefore
leaves the previous checkpoint as the one ``--train.resume auto`` picks; the ``.partial`` folder
is reported and removed by the next save. A checkpoint whose files do not match ``run.json``
(a missing or truncated file) is refused naming the file; ``--train.resume auto-previous`` then
resumes from the newest complete checkpoint before it.

A record with ``"weights_only": true`` (an imported HF model, ``spactor convert from-hf``) holds
D's weights and nothing else: training starts from them with a fresh G and optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader

from spactor_mega.config import ConfigError
from spactor_mega.curriculum import Phase, phase_at, tau_bound
from spactor_mega.errors import UserError
from spactor_mega.parallel import collectives
from spactor_mega.plan.derived import uses_bf16

RUN_RECORD = "run.json"
# run.json's "format": 2 since Adafactor's state is kept per parameter (commit 0fc54ae; Megatron
# engine). Records without it are older: format 1, or 2 written the day it came (the files tell).
CHECKPOINT_FORMAT = 2
# The last commit whose code wrote Adafactor's state as one object per (TP, PP) rank and runs.
ADAFACTOR_PER_RANK_UNTIL = "4773a7c"
LATEST = "latest"
FILES = "files"  # run.json's {path relative to the checkpoint: size in bytes}
TOKENIZER_CONFIG = "tokenizer_config.json"  # an HF tokenizer folder's config (its sentinels), copied beside spiece.model


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded here; the message names it and what to do."""

    same_on_every_rank = True


PARTIAL = ".partial"  # the suffix of a folder still being written
# Test-only fault injection: "<point>@<step>" kills the process (SIGKILL, as a node failure or the
# OOM killer would) at that point of the save of that step; read here and nowhere else.
KILL_IN_SAVE = "SPACTOR_TEST_KILL_IN_SAVE"
SAVE_POINTS = ("before_shards", "between_shards", "before_record", "before_latest")


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of an ``iter_NNNNNNN`` folder (None for any other name, ``.partial`` ones too)."""
    name = path.name
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def save_fault_point(point: str, step: int) -> None:
    """Dies here when the test hook :data:`KILL_IN_SAVE` names this point of this step's save; under
    torchrun on the job's first attempt only, so that the restarted job runs through."""
    if (os.environ.get(KILL_IN_SAVE) == f"{point}@{step}"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        collectives.barrier()


def prepare_checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    """An empty ``iter_NNNNNNN.partial`` directory for every rank to write into (collective). The
    ``.partial`` folders of interrupted saves go first: no other save is in flight now."""
    save_dir = Path(save_dir)
    path = save_dir / f"{checkpoint_dir(save_dir, step).name}{PARTIAL}"
    if _rank() == 0:
        for stale in save_dir.glob(f"iter_*{PARTIAL}"):
            shutil.rmtree(stale)
        path.mkdir(parents=True)
    _barrier()
    save_fault_point("before_shards", step)
    return path


def commit_checkpoint(save_dir: str | Path, path: Path, record: dict, tokenizer_file: Optional[Path]) -> Path:
    """After every rank wrote its part of ``path`` (a :func:`prepare_checkpoint_dir` folder;
    collective): tokenizer (``spiece.model``, and the ``tokenizer_config.json`` beside the model file
    if there is one), ``run.json`` with every file's size, the folder renamed to
    ``iter_NNNNNNN``, then ``latest``; then the retention policy of ``record``'s config. Returns
    the published folder."""
    _barrier()
    step = int(record["step"])
    final = checkpoint_dir(save_dir, step)
    if _rank() == 0:
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, path / "spiece.model")
            # An HF tokenizer's config beside it states its sentinels (e.g. UMT5's extra_ids): kept
            # with the model file, so the checkpoint's tokenizer numbers them the same way.
            sentinels = Path(tokenizer_file).parent / TOKENIZER_CONFIG
            if sentinels.is_file():
                shutil.copy(sentinels, path / TOKENIZER_CONFIG)
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        save_fault_point("before_record", step)
        _write_durably(path / RUN_RECORD, json.dumps({**record, FILES: files}, indent=2, default=str))
        if final.exists():  # a complete checkpoint of this step that never became `latest`
            shutil.rmtree(final)
        os.replace(path, final)
        save_fault_point("before_latest", step)
        tmp = Path(save_dir) / f".{LATEST}.tmp"
        _write_durably(tmp, final.name + "\n")
        os.replace(tmp, Path(save_dir) / LATEST)
        train = record.get("config", {}).get("train", {})
        apply_retention(save_dir, step, train.get("keep_last_checkpoints", 0), train.get("keep_every"))
    _barrier()
    return final


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def apply_retention(save_dir: str | Path, written: int, keep_last: int, keep_every: Optional[int]) -> list[Path]:
    """Deletes the complete checkpoints before step ``written`` that are neither among the newest
    ``keep_last`` (0: all are kept; the one just written counts) nor a multiple of ``keep_every``;
    returns them. Only complete ones (with ``run.json``) are candidates: never a ``.partial``
    folder, the one just written, nor one of a later step (left by an interrupted earlier run)."""
    if keep_last <= 0:
        return []
    complete = sorted((step, path) for path in Path(save_dir).iterdir()
                      if (step := checkpoint_step(path)) is not None and step < written
                      and (path / RUN_RECORD).is_file())
    kept = {step for step, _ in complete[max(0, len(complete) - (keep_last - 1)):]} if keep_last > 1 else set()
    doomed = [path for step, path in complete if step not in kept and not (keep_every and step % keep_every == 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def make_record(cfg, step: int, vocab_size: int, tau: Optional[float] = None, **extra) -> dict:
    """A checkpoint's run.json: step, samples consumed, curriculum phase, resolved precision,
    layout, padded vocab, the config. ``tau``: the run's tau where it is not the config's number
    (``spactor.tau: auto``: the decided one, or its bound until then)."""
    p = cfg.parallel
    tau = tau_bound(cfg.spactor) if tau is None else tau
    return {
        "format": CHECKPOINT_FORMAT, "step": step, "consumed_samples": step * cfg.train.global_batch_size,
        "phase": phase_at(step, tau).name, "precision": "bf16" if uses_bf16(cfg) else "fp32",
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "vocab_size": vocab_size, "config": cfg.to_dict(), **extra,
    }


def recorded_phase(record: dict) -> Optional[str]:
    """The record's curriculum phase name; records written before the rename call it ``"stage"``."""
    return record.get("phase", record.get("stage"))


def recorded_skipped_steps(record: dict) -> tuple[int, int]:
    """(skipped steps in all, of them in a row at the record's step) of the run that wrote the record;
    (0, 0) for records written before these were kept (and for imported models)."""
    return int(record.get("skipped_steps", 0)), int(record.get("skipped_in_a_row", 0))


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


def verify_files(path: Path, record: dict) -> None:
    """Refuses a checkpoint one of whose files is missing or of another size than ``run.json``
    records (a truncated shard, a deleted file), naming the file. Records written before the
    sizes were recorded are not checked."""
    for name, size in record.get(FILES, {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing, so the checkpoint is damaged")
        if (actual := file.stat().st_size) != size:
            raise CheckpointError(f"{file}: {actual} bytes but {size} were written (truncated or altered), "
                                  "so the checkpoint is damaged")


def complete_checkpoint(path: Path) -> dict:
    """``path``'s record, once its files are checked against it (:func:`verify_files`)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    record = read_record(path)
    verify_files(path, record)
    return record


def find_checkpoint(resume: Optional[str], save_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume, checked complete (:func:`complete_checkpoint`), or None.

    ``auto``: the one ``save_dir/latest`` names, or None without ``latest``. ``auto-previous``:
    the same, or, when it is damaged, the newest complete one before it. Anything else: the
    checkpoint folder given, or a save dir's latest."""
    if not resume:
        return None
    if resume not in ("auto", "auto-previous"):
        path = Path(resume)
        if not (path / RUN_RECORD).is_file() and (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()  # a save dir: its latest checkpoint
        complete_checkpoint(path)
        return path
    save_dir = Path(save_dir)
    latest = save_dir / LATEST
    if not latest.is_file():
        return None
    path = save_dir / latest.read_text().strip()
    for partial in sorted(save_dir.glob(f"iter_*{PARTIAL}")):
        _say(f"[checkpoint] ignoring {partial}: a save that did not complete (the next save removes it)")
    try:
        complete_checkpoint(path)
        return path
    except CheckpointError as damaged:
        if resume == "auto":
            raise CheckpointError(f"{damaged}; resume with --train.resume auto-previous (the newest complete "
                                  "checkpoint before it) or delete it") from None
        newest = checkpoint_step(path)
        earlier = sorted((step, p) for p in save_dir.iterdir()
                         if (step := checkpoint_step(p)) is not None and (newest is None or step < newest))
        for _, candidate in reversed(earlier):
            try:
                complete_checkpoint(candidate)
            except CheckpointError as e:
                _say(f"[checkpoint] skipping {e}")
                continue
            _say(f"[checkpoint] {damaged}; resuming from the newest complete checkpoint before it, {candidate}")
            return candidate
        raise CheckpointError(f"{damaged}; and no complete checkpoint before it under {save_dir}") from None


def _say(line: str) -> None:
    if _rank() == 0:
        print(line, flush=True)


def check_save_dir(save_dir: str | Path, checkpoint_bytes: float) -> None:
    """Refuses, before training, a ``train.save_dir`` that cannot be created or written, or whose
    file system has less free space than one checkpoint (``checkpoint_bytes``, estimated)."""
    path = Path(save_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"train.save_dir={path}: not writable ({e.strerror or type(e).__name__}); "
                              "pick a directory this user can write") from None
    free = shutil.disk_usage(path).free
    if free < checkpoint_bytes:
        raise ConfigError(f"train.save_dir={path}: {free / 1e9:.2f} GB free but one checkpoint needs about "
                              f"{checkpoint_bytes / 1e9:.2f} GB; free space there or pick another train.save_dir")


# The fields that fix the parameters' shapes (and what they mean): a checkpoint written with
# other values is another model. The generator's only matter while it is in the checkpoint.
_MODEL_FIELDS = ("d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                 "vocab_size", "feed_forward", "tie_word_embeddings", "relative_attention_per_layer")
_GENERATOR_FIELDS = ("depth_fraction", "d_ff", "num_heads")
_DEFAULTS = {"init": "megatron", "feed_forward": "gated-gelu", "tie_word_embeddings": False,
             "relative_attention_per_layer": False}  # what a field added later meant in checkpoints written before it


def check_resumable(path: Path, record: dict, cfg, vocab_size: int, pipeline_layout: str) -> None:
    """Refuses, before anything is built, a checkpoint of another engine or model (naming the field)
    and one whose optimizer state cannot be resharded to this run's layout (Adafactor's factored
    moments are per TP shard); model weights and AdamW state load under any TP/PP/DP layout,
    Adafactor state under any PP split and DP size. A weights-only
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
        if engine == "megatron" and _adafactor_state_per_rank(path, record):
            tp, pp = record.get("tensor_model_parallel_size", 1), record.get("pipeline_model_parallel_size", 1)
            raise CheckpointError(
                f"{path}: holds Adafactor state in the layout before commit 0fc54ae (one object per TP/PP rank, "
                "now one per parameter), which this version cannot load; keep its weights and start G, the RTD "
                f"head and the optimizers afresh: spactor convert to-hf {path} HF_DIR, then spactor convert "
                f"from-hf HF_DIR NEW_SAVE_DIR --tp {tp} --pp {pp} and train with --train.resume NEW_SAVE_DIR "
                f"(from step 0), or resume it with the code of commit {ADAFACTOR_PER_RANK_UNTIL}")
        then, now = record.get("tensor_model_parallel_size"), cfg.parallel.tensor_model_parallel_size
        if then != now:
            raise CheckpointError(
                f"{path}: Adafactor's factored moments are kept per tensor-parallel shard and were written under "
                f"TP={then}; resume with parallel.tensor_model_parallel_size={then} (this run: TP={now}; "
                "any pipeline split and DP size work)")


def _adafactor_state_per_rank(path: Path, record: dict) -> bool:
    """A Megatron checkpoint whose Adafactor state is one object per (TP, PP) rank (keys
    ``d_optimizer.adafactor`` and ``aux_optimizer.adafactor``, before format 2): read from its
    dist-checkpoint metadata, since records before the ``format`` field hold either layout."""
    if record.get("format", 1) >= 2:
        return False
    metadata = FileSystemReader(str(path)).read_metadata()
    return any(key.split("/shard_")[0] in ("d_optimizer.adafactor", "aux_optimizer.adafactor")
               for key in metadata.state_dict_metadata)


def strip_prefix(state: dict, prefix: str) -> dict:
    """``state`` with ``prefix`` taken off the keys that have it (checkpoint keys -> module names)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
