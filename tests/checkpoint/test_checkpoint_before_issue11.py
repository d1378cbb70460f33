"""A checkpoint written by the code before issue 11 (commit 8d6f079: run.json says "stage", its config
has no model.init) still resumes training and exports to HF as that code exported it
(tests/fixtures/checkpoint_8d6f079: the checkpoint, reference.json and make.py, which wrote both)."""

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_training import run, tiny_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_8d6f079"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())


def test_old_checkpoint_resumes_where_it_stopped(tmp_path):
    from spactor_mega.checkpoint.store import CheckpointError, check_resumable, read_record

    cfg = tiny_config(tmp_path / "run", spactor__tau=4, train__steps=3, train__resume=str(FIXTURE))
    cfg.model.num_heads, cfg.model.num_encoder_layers, cfg.model.num_decoder_layers = 2, 2, 2
    cfg.data.tokenizer = str(FIXTURE / "iter_0000002" / "spiece.model")  # the data are tokenized as they were
    old = read_record(FIXTURE / "iter_0000002")
    assert "stage" in old and "phase" not in old
    depth = cfg.generator.depth_fraction
    cfg.generator.depth_fraction = depth / 2  # an old record's phase is read: before tau, G's shape is checked too
    with pytest.raises(CheckpointError, match="written for generator.depth_fraction"):
        check_resumable(FIXTURE / "iter_0000002", old, cfg, old["vocab_size"], "")
    cfg.generator.depth_fraction = depth

    # Megatron's dist_checkpointing refuses a load that misses any tensor asked for: D, G, the RTD
    # head and both AdamW states all come from the old files (the step is hybrid: G is in use).
    result = run(cfg)
    assert [h["step"] for h in result["history"]] == [3]
    assert result["history"][0]["generator_params"] > 0 and torch.isfinite(torch.tensor(result["history"][0]["loss"]))
    assert read_record(result["checkpoint"])["phase"] == "HYBRID"


def test_old_checkpoint_exports_to_hf(tmp_path):
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    from spactor_mega.convert.hf_export import RTD_HEAD_FILE, export_to_hf

    out = export_to_hf(FIXTURE, tmp_path / "hf", with_rtd_head=True)
    hf = T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        loss = hf(**{k: torch.tensor(v) for k, v in REFERENCE["hf_example"].items()}).loss.item()
    assert loss == pytest.approx(REFERENCE["hf_loss"], rel=1e-6)
    assert sorted(load_file(str(out / RTD_HEAD_FILE))) == ["dense.bias", "dense.weight", "out.bias", "out.weight"]
