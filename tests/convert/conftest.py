"""A randomly initialised HF T5 v1.1 folder, as a hub download holds it (weights, config, tokenizer)."""

import shutil

import pytest
import torch

HF_VOCAB = 320  # more rows than the tiny tokenizer's pieces + sentinels + mask, as HF T5's 32128 > 32101


@pytest.fixture(scope="session")
def random_hf_t5(tmp_path_factory, tiny_spm):
    """3 + 2 layers, d_model 32, d_ff 48, untied head, saved by transformers with tokenizer files."""
    from transformers import T5Tokenizer

    from spactor_mega.config import ModelConfig
    from spactor_mega.model.hf_mapping import build_hf_model

    folder = tmp_path_factory.mktemp("hf_random")
    shape = ModelConfig(d_model=32, d_kv=8, d_ff=48, num_heads=2, num_encoder_layers=3, num_decoder_layers=2)
    torch.manual_seed(3)
    model = build_hf_model(shape, HF_VOCAB)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    shutil.copy(tiny_spm, folder / "spiece.model")
    T5Tokenizer.from_pretrained(str(folder), extra_ids=100).save_pretrained(str(folder))
    return folder
