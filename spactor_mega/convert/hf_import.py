"""``spactor convert from-hf``: a Hugging Face T5-family model -> our checkpoint, to continue pretraining.

    import_from_hf("flan-t5-base", "runs/flan-t5-base/checkpoints", tp=2, pp=1)
    spactor train --config configs/continue-flan-t5.yaml

Takes model types ``t5`` (T5 v1.0: ReLU feed-forward, tied head with the d_model**-0.5 rescale;
v1.1 and Flan-T5: gated-GELU, untied; UL2-style gated-SiLU), ``mt5`` and ``umt5`` (a bias table per
layer). The model config (kind, sizes, relative-attention buckets, eps, vocabulary rows) comes from
the HF ``config.json`` and the loaded model (whether its head is tied); the tokenizer is the
folder's ``spiece.model`` with its sentinel convention (:mod:`spactor_mega.data.tokenizer`). The
checkpoint is the directory training writes (``iter_0000000/`` with D's sharded tensors,
``run.json``, ``spiece.model``; ``latest``) plus ``config.yaml``, the run's config to train with.
It holds D only and is marked ``weights_only``: training loads D from it and starts G, the RTD
head, the optimizers and the step counter afresh.

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

from spactor_mega.checkpoint.megatron import save_checkpoint
from spactor_mega.checkpoint.store import make_record
from spactor_mega.config import FEED_FORWARDS, Config
from spactor_mega.convert.hf_export import prepare_output, publish_output
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.errors import UserError
from spactor_mega.model.hf_mapping import hf_classes, hf_head_is_tied, hf_to_megatron
from spactor_mega.model.t5 import T5Discriminator, model_vocab_size
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.plan.validate import validate


class ImportRefused(UserError):
    """An HF model this importer cannot take; the message says what it is and what to use."""


HF_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                    "umt5": "UMT5ForConditionalGeneration"}


def feed_forward_of(doc: dict) -> str:
    """A config.json's feed_forward_proj, with its class's default where it has none (T5Config:
    relu; MT5Config and UMT5Config: gated-gelu)."""
    return doc.get("feed_forward_proj", "relu" if doc.get("model_type") == "t5" else "gated-gelu")


def read_hf_t5_config(hf_dir: Path) -> dict:
    """The folder's config.json, if it describes a T5-family encoder-decoder we can train (model
    type t5, mt5 or umt5 with a feed-forward of :data:`FEED_FORWARDS`); else a one-line refusal."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ImportRefused(f"{hf_dir}: no config.json; point at a Hugging Face T5, mT5 or UMT5 model folder")
    try:
        doc = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ImportRefused(f"{config_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    kind = doc.get("model_type")
    if kind not in HF_ARCHITECTURES:
        raise ImportRefused(f"{config_file}: model_type {kind!r} is not of the T5 family; t5 (T5 v1.0/v1.1, "
                            "Flan-T5, UL2-style), mt5 and umt5 models can be imported")
    architecture = HF_ARCHITECTURES[kind]
    architectures = doc.get("architectures") or [architecture]
    if architecture not in architectures:
        raise ImportRefused(f"{config_file}: architectures {architectures} has no {architecture}; an "
                            "encoder-decoder with its LM head is needed")
    ff = feed_forward_of(doc)
    if ff not in FEED_FORWARDS:
        raise ImportRefused(f"{config_file}: feed_forward_proj {ff!r}; the feed-forwards that can be imported are "
                            f"{', '.join(FEED_FORWARDS)}")
    return doc


def head_is_tied(hf_model, source: Path) -> bool:
    """Whether the loaded HF model's LM head is the embedding read with T5 v1.0's d_model**-0.5
    rescale (True) or a head of its own without it (False); a tied head without the rescale, or
    an untied one with it, is a layout no public T5 has and is refused."""
    tied = hf_head_is_tied(hf_model)
    scaled = bool(getattr(hf_model.config, "scale_decoder_outputs", False))  # MT5 never rescales
    if tied != scaled:
        what = "a tied LM head without" if tied else "an untied LM head with"
        raise ImportRefused(f"{source}: {what} the decoder-output rescale; only T5 v1.0's tied, rescaled head "
                            "and the untied head of v1.1/mT5/UMT5 can be trained here")
    return tied


def config_for_hf_model(doc: dict, tied: bool, tokenizer: Path, tp: int, pp: int):
    """Our :class:`~spactor_mega.config.Config` for the HF model ``doc`` (sizes and kind from it;
    dropout-free continued pretraining)."""
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_kv, m.d_ff, m.num_heads = doc["d_model"], doc["d_kv"], doc["d_ff"], doc["num_heads"]
    m.num_encoder_layers = doc["num_layers"]
    m.num_decoder_layers = doc.get("num_decoder_layers") or doc["num_layers"]
    m.relative_attention_num_buckets = doc.get("relative_attention_num_buckets", 32)
    m.relative_attention_max_distance = doc.get("relative_attention_max_distance", 128)
    m.layer_norm_epsilon = doc.get("layer_norm_epsilon", 1e-6)
    m.hf_model_type = doc["model_type"]
    m.feed_forward = feed_forward_of(doc)
    m.tie_word_embeddings = tied
    m.relative_attention_per_layer = m.hf_model_type == "umt5"
    m.vocab_size = doc["vocab_size"]
    # The HF rows are the padded vocabulary already (32128 for T5): pad further only where TP does
    # not divide them, so the checkpoint loads under any such TP and no zero-logit rows are added.
    m.make_vocab_size_divisible_by = 1
    m.dropout = 0.0  # continued pretraining; fine-tuning configs on the hub carry 0.1
    cfg.data.tokenizer = str(tokenizer)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    return cfg


def import_from_hf(hf_dir: str | Path, save_dir: str | Path, *, tp: int = 1, pp: int = 1, force: bool = False) -> Path:
    """Writes ``save_dir`` (a training save dir holding ``iter_0000000``) from the HF model in ``hf_dir``."""
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    doc = read_hf_t5_config(hf_dir)
    if not (hf_dir / "spiece.model").is_file():
        raise ImportRefused(f"{hf_dir}: no spiece.model; the model's SentencePiece tokenizer is needed (copy it "
                            "from the model's hub folder)")
    tokenizer = T5SentencePieceTokenizer(hf_dir)
    if tokenizer.vocab_size > doc["vocab_size"]:
        raise ImportRefused(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{doc['vocab_size']} embedding rows; tokenizer and model do not belong together")
    tmp = prepare_output(save_dir, force)
    try:
        _, model_class = hf_classes(doc["model_type"])
        hf, info = model_class.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
            raise ImportRefused(f"{hf_dir}: the weights do not fit its config.json ({', '.join(bad[:3])} missing or "
                                "of another shape)")
        # The checkpoint folder, not its spiece.model: a tokenizer_config.json there keeps the sentinels' numbering
        cfg = config_for_hf_model(doc, head_is_tied(hf, hf_dir), (save_dir / "iter_0000000").resolve(), tp, pp)
        validate(cfg, tp * pp)
        vocab = model_vocab_size(cfg.model, tokenizer.model_vocab_size, tp)
        m = cfg.model
        weights = hf_to_megatron(hf.state_dict(), m, vocab)
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
