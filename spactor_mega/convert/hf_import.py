"""``spactor convert from-hf``: a T5 v1.1 Hugging Face model -> our checkpoint, to continue pretraining.

    import_from_hf("t5-v1_1-base", "runs/t5b/checkpoints", tp=2, pp=1)
    spactor train --config runs/t5b/checkpoints/config.yaml --train.resume runs/t5b/checkpoints ...

The model config (sizes, relative-attention buckets, eps, vocabulary rows) comes from the HF
``config.json``; the tokenizer is the folder's ``spiece.model``. The checkpoint is the directory
training writes (``iter_0000000/`` with D's sharded tensors, ``run.json``, ``spiece.model``;
``latest``) plus ``config.yaml``, the run's config to train with. It holds D only and is marked
``weights_only``: training loads D from it and starts G, the RTD head and the optimizers afresh.

One process writes it: ``dist_checkpointing`` tensors carry global names and shapes, so a
checkpoint written from a TP = 1 model loads under any TP/PP. The vocabulary keeps the HF
model's rows (``model.make_vocab_size_divisible_by: 1``): they are padded (zero rows) only for
a TP size that does not divide them (the layout asked for is checked and recorded).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from transformers import T5ForConditionalGeneration

from spactor_mega.checkpoint.megatron import save_checkpoint
from spactor_mega.checkpoint.store import make_record
from spactor_mega.config import Config
from spactor_mega.convert.hf_export import prepare_output, publish_output
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.errors import UserError
from spactor_mega.model.hf_mapping import hf_to_megatron
from spactor_mega.model.t5 import T5Discriminator, model_vocab_size
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.plan.validate import validate


class ImportRefused(UserError):
    """An HF model this importer cannot take; the message says what it is and what to use."""


def read_t5_v11_config(hf_dir: Path) -> dict:
    """The folder's config.json, if it describes a T5 v1.1-architecture model; else a one-line refusal."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ImportRefused(f"{hf_dir}: no config.json; point at a Hugging Face T5 v1.1 model folder")
    try:
        doc = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ImportRefused(f"{config_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    kind = doc.get("model_type")
    if kind != "t5":
        raise ImportRefused(f"{config_file}: model_type {kind!r} is not T5; only T5 v1.1-architecture models "
                            "(gated-GELU feed-forward, untied LM head) can be imported")
    architectures = doc.get("architectures") or ["T5ForConditionalGeneration"]
    if "T5ForConditionalGeneration" not in architectures:
        raise ImportRefused(f"{config_file}: architectures {architectures} has no T5ForConditionalGeneration; an "
                            "encoder-decoder with its LM head is needed")
    ff = doc.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        version = "T5 v1.0 (ReLU feed-forward)" if ff == "relu" else f"feed_forward_proj {ff!r}"
        raise ImportRefused(f"{config_file}: {version}; only T5 v1.1 (feed_forward_proj 'gated-gelu') can be "
                            "imported: start from a v1.1 checkpoint such as google/t5-v1_1-base")
    # transformers 5.x writes `tie_word_embeddings: true` for every T5 and marks v1.1's untied head
    # with `scale_decoder_outputs: false`; 4.x and the hub's v1.1 configs say `tie_word_embeddings: false`.
    tied = doc.get("tie_word_embeddings", True) is not False and doc.get("scale_decoder_outputs", True) is not False
    if tied:
        raise ImportRefused(f"{config_file}: tied input/output embeddings (T5 v1.0 style, tie_word_embeddings true); "
                            "only T5 v1.1 (untied LM head) can be imported")
    return doc


def config_for_hf_model(doc: dict, tokenizer_file: Path, tp: int, pp: int):
    """Our :class:`~spactor_mega.config.Config` for the HF model ``doc`` (sizes from it; T5 v1.1's
    dropout-free pretraining)."""
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_kv, m.d_ff, m.num_heads = doc["d_model"], doc["d_kv"], doc["d_ff"], doc["num_heads"]
    m.num_encoder_layers = doc["num_layers"]
    m.num_decoder_layers = doc.get("num_decoder_layers") or doc["num_layers"]
    m.relative_attention_num_buckets = doc.get("relative_attention_num_buckets", 32)
    m.relative_attention_max_distance = doc.get("relative_attention_max_distance", 128)
    m.layer_norm_epsilon = doc.get("layer_norm_epsilon", 1e-6)
    m.vocab_size = doc["vocab_size"]
    # The HF rows are the padded vocabulary already (32128 for T5): pad further only where TP does
    # not divide them, so the checkpoint loads under any such TP and no zero-logit rows are added.
    m.make_vocab_size_divisible_by = 1
    m.dropout = 0.0  # continued pretraining; fine-tuning configs on the hub carry 0.1
    cfg.data.tokenizer = str(tokenizer_file)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    return cfg


def import_from_hf(hf_dir: str | Path, save_dir: str | Path, *, tp: int = 1, pp: int = 1, force: bool = False) -> Path:
    """Writes ``save_dir`` (a training save dir holding ``iter_0000000``) from the HF model in ``hf_dir``."""
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    doc = read_t5_v11_config(hf_dir)
    if not (hf_dir / "spiece.model").is_file():
        raise ImportRefused(f"{hf_dir}: no spiece.model; the model's SentencePiece tokenizer is needed (copy it "
                            "from the model's hub folder)")
    tokenizer = T5SentencePieceTokenizer(hf_dir)
    if tokenizer.vocab_size > doc["vocab_size"]:
        raise ImportRefused(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{doc['vocab_size']} embedding rows; tokenizer and model do not belong together")
    tmp = prepare_output(save_dir, force)
    try:
        cfg = config_for_hf_model(doc, (save_dir / "iter_0000000" / "spiece.model").resolve(), tp, pp)
        validate(cfg, tp * pp)
        vocab = model_vocab_size(cfg.model, tokenizer.model_vocab_size, tp)
        m = cfg.model
        hf, info = T5ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
            raise ImportRefused(f"{hf_dir}: the weights do not fit its config.json ({', '.join(bad[:3])} missing or "
                                "of another shape)")
        weights = hf_to_megatron(hf.state_dict(), m.num_heads, m.num_encoder_layers, m.num_decoder_layers, vocab)
        del hf
        record = make_record(cfg, 0, vocab, weights_only=True, imported_from=str(hf_dir.resolve()))
        with single_process_parallel():
            d = T5Discriminator(m, vocab)
            result = d.load_state_dict(weights, strict=False)  # Megatron's _extra_state entries stay as built
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"HF -> D mapping mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
            del weights
            save_checkpoint(tmp, 0, {"discriminator": d.sharded_state_dict(prefix="discriminator.")}, record,
                            tokenizer.model_file)
        (tmp / "config.yaml").write_text(
            f"# The config of the model imported from {hf_dir}; add data and train settings:\n"
            f"#   spactor train --config {save_dir / 'config.yaml'} --train.resume {save_dir} --data.train_data ...\n"
            + yaml.safe_dump({k: cfg.to_dict()[k] for k in ("model", "data", "parallel")}, sort_keys=False)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_output(tmp, save_dir)
