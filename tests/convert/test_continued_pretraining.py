"""Continued pretraining of a public T5 family, end to end: a small HF model of the family
(tests/hf_families.py) -> ``spactor convert from-hf`` -> ``spactor train`` from the import (the
presets' ``train.resume: auto`` into the import folder) for 20 SpacTor steps across tau = 10 on the
demo corpus, tokenized with the family's own tokenizer -> ``spactor convert to-hf``: the family's HF
class loads the export, whose SC loss on held-out text (computed by transformers) is below the
imported model's. The imported weights are random, so this shows that the path trains, not more.

- T5 v1.0 (ReLU feed-forward, tied head with the d_model**-0.5 rescale) on the Megatron engine under
  PP = 2 with Adafactor at a constant rate (the presets' optimizer): the last stage's copy of the
  tied embedding must equal the first stage's embedding after training (the tied gradient sum).
- UMT5 (a relative-attention bias table per layer, 300 appended sentinels) on the DeepSpeed engine,
  ZeRO-2 over DP = 2 (AdamW: ZeRO-2 shards what Adafactor factors): the export keeps the sentinels.

One launch per engine (2 processes each); everything else runs in the test process. And each
``configs/continue-*.yaml`` preset holds its public model as `from-hf` reads it from the hub's
config.json, and its dry run prices that model.
"""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from spactor_mega.config import load_yaml
from spactor_mega.parallel.testing import run_distributed
from tests.convert.test_trained_export import held_out_examples
from tests.hf_families import hf_class
from tests.training.engine_runs import train_and_inspect
from tests.training.test_training import tiny_config

STEPS, TAU = 20, 10
ROOT = Path(__file__).resolve().parents[2]
_BASE = dict(d_model=768, d_kv=64, num_heads=12, num_layers=12, relative_attention_num_buckets=32,
             layer_norm_epsilon=1e-6)
# The fields of each preset's model that its hub config.json states (t5-base: no feed_forward_proj, so ReLU)
HUB_CONFIGS = {
    "continue-t5.yaml": (dict(_BASE, model_type="t5", d_ff=3072, vocab_size=32128), True),
    "continue-flan-t5.yaml": (dict(_BASE, model_type="t5", d_ff=2048, feed_forward_proj="gated-gelu",
                                   num_decoder_layers=12, relative_attention_max_distance=128,
                                   vocab_size=32128), False),
    "continue-mt5.yaml": (dict(_BASE, model_type="mt5", d_ff=2048, feed_forward_proj="gated-gelu",
                               num_decoder_layers=12, vocab_size=250112), False),
    "continue-umt5.yaml": (dict(_BASE, model_type="umt5", d_ff=2048, feed_forward_proj="gated-gelu",
                                num_decoder_layers=12, relative_attention_max_distance=128, vocab_size=256384), False),
}


def _config(work, save_dir, **overrides):
    """The tiny test run, continuing from the import in ``save_dir`` with the model, layout and tokenizer
    `from-hf` wrote into its config.yaml; the demo validation shard tokenized with that tokenizer."""
    imported = load_yaml(save_dir / "config.yaml")
    cfg = tiny_config(work / "run", train__steps=STEPS, spactor__tau=float(TAU), train__save_dir=str(save_dir),
                      train__resume="auto", train__eval_interval=STEPS, data__tokenizer=imported.data.tokenizer,
                      **overrides)
    cfg.model, cfg.parallel = imported.model, imported.parallel
    return cfg


def _inspect(cfg, result, engine) -> dict:
    """The run's metrics; on the Megatron engine with a tied head, this stage's embedding or the last
    stage's copy of it (``shared_embedding_or_output_weight``)."""
    out = {"history": result.history, "evals": result.evals}
    if cfg.train.engine == "megatron" and cfg.model.tie_word_embeddings:
        out["tied_weight"] = engine.d_chunks[0].module.shared_embedding_or_output_weight().detach().clone()
    return out


def _train(rank, world_size, runs):
    return train_and_inspect(runs, _inspect)


def _continue(hf_family, tmp_path_factory, family, world_size, tp=1, pp=1, **overrides):
    """Imports ``family``, trains it (one launch of ``world_size`` processes) and exports it; returns the
    folders, the run's config and every rank's results."""
    from spactor_mega.convert.hf_export import export_to_hf
    from spactor_mega.convert.hf_import import import_from_hf

    work = tmp_path_factory.mktemp(f"continue_{family}")
    hf_dir = hf_family(family)
    save_dir = import_from_hf(hf_dir, work / "checkpoints", tp=tp, pp=pp)
    cfg = _config(work, save_dir, **overrides)
    results = run_distributed(_train, world_size, [(family, cfg)], timeout=600)
    exported = export_to_hf(save_dir, work / "exported")  # its latest: the run's step-20 checkpoint
    return {"family": family, "hf_dir": hf_dir, "exported": exported, "cfg": cfg,
            "ranks": [r[family] for r in results]}


@pytest.fixture(scope="module")
def t5_v1_0_megatron_pp2(hf_family, tmp_path_factory):
    return _continue(hf_family, tmp_path_factory, "t5-v1_0", 2, pp=2, optim__optimizer="adafactor",
                     optim__lr=1e-2, optim__lr_schedule="constant", optim__clip_grad=0.0)


@pytest.fixture(scope="module")
def umt5_deepspeed_zero2(hf_family, tmp_path_factory):
    adam = tmp_path_factory.mktemp("ds_config") / "torch_adam.json"
    adam.write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))  # no DeepSpeedCPUAdam JIT build
    return _continue(hf_family, tmp_path_factory, "umt5", 2, train__engine="deepspeed", deepspeed__zero_stage=2,
                     deepspeed__config=str(adam), optim__lr_schedule="constant")


def _held_out_sc_loss(folder, family, tokenizer, encoder_length) -> float:
    """transformers' loss of the family's class loaded from ``folder`` on 8 held-out SC examples."""
    model = hf_class(family).from_pretrained(str(folder), dtype=torch.float32).eval()
    inputs, targets, _ = held_out_examples(tokenizer, encoder_length, rows=8)
    with torch.no_grad():
        return model(input_ids=inputs, labels=targets).loss.item()


def _assert_trained_and_exported(run) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

    family, cfg, first = run["family"], run["cfg"], run["ranks"][0]
    # 20 steps from the import's step 0: hybrid (G fresh) up to tau, SC only after
    assert [h["step"] for h in first["history"]] == list(range(1, STEPS + 1))
    assert [h["phase"] for h in first["history"]] == [1.0] * TAU + [2.0] * (STEPS - TAU)
    assert [e["step"] for e in first["evals"]] == [0, STEPS]

    ours = T5SentencePieceTokenizer(run["hf_dir"])
    exported_tokenizer = T5SentencePieceTokenizer(run["exported"])
    assert (exported_tokenizer.num_sentinels, exported_tokenizer.sentinels_in_model) == (
        ours.num_sentinels, ours.sentinels_in_model)
    hf_tokenizers = [AutoTokenizer.from_pretrained(str(run[folder])) for folder in ("exported", "hf_dir")]
    assert len(hf_tokenizers[0]) == len(hf_tokenizers[1])
    assert type(AutoModelForSeq2SeqLM.from_pretrained(str(run["exported"]))) is hf_class(family)

    before = _held_out_sc_loss(run["hf_dir"], family, ours, cfg.data.encoder_seq_length)
    after = _held_out_sc_loss(run["exported"], family, ours, cfg.data.encoder_seq_length)
    valid = [e["sc_loss"] for e in first["evals"]]
    print(f"{family}: held-out SC loss (transformers) {before:.3f} -> {after:.3f}; "
          f"validation SC loss (ours) {valid[0]:.3f} -> {valid[1]:.3f}")
    assert after < before, (before, after)


def test_t5_v1_0_continues_on_the_megatron_engine_under_pp2(t5_v1_0_megatron_pp2):
    _assert_trained_and_exported(t5_v1_0_megatron_pp2)


def test_the_tied_heads_copy_stays_the_embedding_under_pp2(t5_v1_0_megatron_pp2):
    """The last stage's copy of the tied embedding (its LM head) got the same updates as the
    embedding on the first stage: both got the summed gradient."""
    from safetensors.torch import load_file

    first, last = (r["tied_weight"] for r in t5_v1_0_megatron_pp2["ranks"])
    imported = load_file(t5_v1_0_megatron_pp2["hf_dir"] / "model.safetensors")["shared.weight"]
    rows = imported.shape[0]
    assert torch.equal(first, last)
    assert not torch.equal(first[:rows], imported)  # it trained


def test_umt5_continues_on_the_deepspeed_engine_with_zero2(umt5_deepspeed_zero2):
    _assert_trained_and_exported(umt5_deepspeed_zero2)


def _hf_parameters(doc: dict, tied: bool) -> int:
    """The HF model's parameter count (built on the meta device: no memory, no init)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(doc["model_type"], **{k: v for k, v in doc.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("lm_head."))
    return body + (0 if tied else model.lm_head.weight.numel())  # transformers 5.x ties every head it builds


@pytest.mark.parametrize("preset", sorted(HUB_CONFIGS))
def test_each_continue_preset_is_its_public_model(preset, monkeypatch):
    from spactor_mega.cli import main
    from spactor_mega.convert.hf_import import config_for_hf_model

    doc, tied = HUB_CONFIGS[preset]
    cfg = load_yaml(ROOT / "configs" / preset)
    assert cfg.model == config_for_hf_model(doc, tied, Path("spiece.model"), 1, 1).model
    # starts from the import folder's iter_0000000 (its tokenizer too), later from the run's own latest
    assert cfg.train.resume == "auto" and Path(cfg.data.tokenizer) == Path(cfg.train.save_dir) / "iter_0000000"
    assert cfg.spactor.tau == cfg.train.steps / 4
    monkeypatch.chdir(ROOT)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "--config", f"configs/{preset}", "--dry-run"]) == 0
    vocab, d_millions = re.search(r"parameters \(vocab (\d+)\): D ([\d,.]+)M", out.getvalue()).groups()
    assert int(vocab) == doc["vocab_size"]
    assert d_millions == f"{_hf_parameters(doc, tied) / 1e6:,.1f}"
