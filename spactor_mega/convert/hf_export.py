"""``spactor convert to-hf``: a checkpoint we wrote -> a Hugging Face T5-family model folder
(``model.hf_model_type``: ``T5ForConditionalGeneration``, ``MT5...`` or ``UMT5...``).

    export_to_hf("runs/demo/checkpoints", "t5-demo-hf")      # a save dir (its latest) or an iter_N dir

Reads D's full tensors through the checkpoint reader of the engine that wrote it (its
``read_weights`` in :data:`spactor_mega.plan.engines.ENGINES`; any TP/PP/DP layout), rebuilds the
model config from the checkpoint's ``run.json``, maps the tensors to HF names (:mod:`spactor_mega.model.hf_mapping`,
consuming them, so the whole costs about one copy of the weights) and lets transformers write the
folder: ``config.json`` (the model's kind: feed-forward, tied or untied head), safetensors shards, a
``generation_config.json``; plus ``spiece.model`` and the tokenizer files (the sentinels as the tokenizer had them), and
``README.md``, the model card the Hub shows (:mod:`spactor_mega.convert.model_card`). G is
dropped; the RTD head is written to ``rtd_head.safetensors`` only when asked for. The folder
appears complete or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from spactor_mega.checkpoint.store import (
    RUN_RECORD,
    CheckpointError,
    find_checkpoint,
    read_record,
    recorded_engine,
)
from spactor_mega.config import config_from_dict
from spactor_mega.convert.hf_tokenizer import hf_tokenizer
from spactor_mega.convert.model_card import model_card
from spactor_mega.data.special_tokens import EOS_ID, PAD_ID
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.errors import OutputExistsError, UserError
from spactor_mega.model.hf_mapping import hf_classes, hf_config, megatron_to_hf, untie_lm_head
from spactor_mega.model.t5 import export_vocab_size
from spactor_mega.plan.engines import ENGINES, resolve
from spactor_mega.plan.inventory import t5_parameter_shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RTD_HEAD_FILE = "rtd_head.safetensors"
MODEL_CARD = "README.md"


def prepare_output(out: str | Path, force: bool) -> Path:
    """The temporary sibling folder to write into (``out`` itself is replaced by :func:`publish_output`)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it or choose another folder")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted earlier run
    tmp.mkdir(parents=True)
    return tmp


def publish_output(tmp: Path, out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out


def checkpoint_config(path: Path, record: dict):
    """The run's :class:`~spactor_mega.config.Config`, as recorded in its run.json."""
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path}/{RUN_RECORD}: has no 'config' section; not a checkpoint written by spactor")
    return config_from_dict(record["config"], f"{path}/{RUN_RECORD}")


def read_module_weights(path: Path, record: dict, modules: tuple[str, ...]) -> dict[str, dict]:
    """``{module: {name: full tensor}}`` for ``modules`` (of discriminator, generator, rtd_head), read
    by the checkpoint reader of the engine that wrote ``path``."""
    engine = recorded_engine(record)
    if engine not in ENGINES:
        raise CheckpointError(f"{path}/{RUN_RECORD}: written by train.engine={engine!r}, which has no checkpoint "
                              f"reader (known: {', '.join(ENGINES)})")
    return resolve(ENGINES[engine].read_weights)(path, record, modules)


def check_weights_match_config(path: Path, weights: dict, model_cfg, vocab_rows: int) -> None:
    """Refuses D tensors that are not what the recorded model config describes (one line)."""
    expected = t5_parameter_shapes(model_cfg, vocab_rows)
    have = {k: tuple(v.shape) for k, v in weights.items() if not k.endswith("_extra_state")}
    for name, shape in expected.items():
        if name not in have:
            raise CheckpointError(f"{path}: no tensor discriminator.{name}, which run.json's model config needs; "
                                  "the checkpoint does not match its run.json")
        if have[name] != shape:
            raise CheckpointError(f"{path}: discriminator.{name} has shape {list(have[name])} but run.json's model "
                                  f"config needs {list(shape)}; the checkpoint does not match its run.json")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: tensor discriminator.{extra[0]} is not part of the model run.json describes "
                              f"({len(extra)} such); the checkpoint does not match its run.json")


def write_hf_model(hf_state: dict, model_cfg, vocab_rows: int, folder: Path, max_shard_size: str,
                   dtype: torch.dtype) -> None:
    """transformers writes the folder: a model of ``model_cfg``'s kind built on the meta device takes
    ``hf_state``'s tensors as its parameters (no copy), then ``save_pretrained`` shards them into
    safetensors files (a tied head is the embedding, stored once)."""
    _, model_class = hf_classes(model_cfg.hf_model_type)
    with torch.device("meta"):
        model = model_class(hf_config(model_cfg, vocab_rows))
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"HF T5 mapping mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if model_cfg.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    else:
        untie_lm_head(model)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    # transformers 5.x writes `tie_word_embeddings: true` for every T5-family model (it forces the
    # flag and keeps v1.1's untied head as `scale_decoder_outputs: false`); 4.x reads that as a tied
    # (and for T5/UMT5 rescaled) head. State the truth, which both read correctly.
    config_file = folder / "config.json"
    doc = json.loads(config_file.read_text())
    doc["tie_word_embeddings"] = model_cfg.tie_word_embeddings
    config_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def write_tokenizer(checkpoint: Path, folder: Path, extra_ids: int) -> None:
    """spiece.model plus the files ``AutoTokenizer.from_pretrained`` reads (with the tokenizer's own
    ``extra_ids``: 100 for T5, 0 for mT5's sentinels inside the model, UMT5's count); a tokenizer.json of
    our own for a byte-fallback / whitespace-keeping model, which HF's T5Tokenizer would not reproduce."""
    shutil.copy(checkpoint / "spiece.model", folder / "spiece.model")
    hf_tokenizer(folder / "spiece.model", extra_ids).save_pretrained(str(folder))


def export_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    with_rtd_head: bool = False,
    force: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Writes the HF folder ``out`` from ``checkpoint`` (an ``iter_N`` dir, or a save dir: its latest)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = find_checkpoint(str(checkpoint), Path(checkpoint))
    record = read_record(path)
    cfg = checkpoint_config(path, record)
    if not (path / "spiece.model").is_file():
        raise CheckpointError(f"{path}: no spiece.model; copy the run's tokenizer (data.tokenizer) into the checkpoint")
    tokenizer = T5SentencePieceTokenizer(path)
    tmp = prepare_output(out, force)
    try:
        modules = ("discriminator", "rtd_head") if with_rtd_head else ("discriminator",)
        weights = read_module_weights(path, record, modules)
        d = weights.pop("discriminator")
        vocab_rows = int(record.get("vocab_size") or d["embedding.weight"].shape[0])
        check_weights_match_config(path, d, cfg.model, vocab_rows)
        rows = export_vocab_size(cfg.model, tokenizer.model_vocab_size)
        m = cfg.model
        hf_state = megatron_to_hf(d, m, rows, consume=True, dtype=DTYPES[dtype])
        write_hf_model(hf_state, m, rows, tmp, max_shard_size, DTYPES[dtype])
        del hf_state
        write_tokenizer(path, tmp, tokenizer.hf_extra_ids)
        (tmp / MODEL_CARD).write_text(model_card(cfg, record, rows, str(out), dtype, with_rtd_head))
        if with_rtd_head:
            write_rtd_head(path, weights.get("rtd_head") or {}, tmp, DTYPES[dtype])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_output(tmp, out)


def write_rtd_head(path: Path, head: dict, folder: Path, dtype: torch.dtype) -> None:
    """The RTD head (dense d->d + GELU + dense d->1, ELECTRA's discriminator head on the encoder
    output) as ``rtd_head.safetensors``; absent after tau (the trainer released it)."""
    if not head:
        raise CheckpointError(f"{path}: holds no RTD head (saved at or after step tau, when it is released); "
                              "export without --with-rtd-head or from a checkpoint before tau")
    tensors = {k: v.to(dtype).contiguous() for k, v in head.items() if not k.endswith("_extra_state")}
    save_file(tensors, str(folder / RTD_HEAD_FILE), metadata={
        "format": "pt", "input": "encoder last_hidden_state [..., d_model]",
        "forward": "out(gelu_new(dense(x))).squeeze(-1): replaced-token logit",
    })
