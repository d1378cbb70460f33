"""The small HF folders of each public T5 family (tests/hf_families.py) are what the importer will meet:
transformers loads each into its family's class with the saved tensors, the head tied or untied
as the family's, and the family's tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from tests.hf_families import FAMILIES, SHAPE, build_hf_family, hf_class

NAMES = sorted(FAMILIES)


@pytest.mark.parametrize("config_style", ["hub", "transformers"])
@pytest.mark.parametrize("name", NAMES)
def test_each_family_reloads_into_its_class_with_the_saved_tensors(hf_family, name, config_style):
    fam = FAMILIES[name]
    folder = hf_family(name, config_style)
    doc = json.loads((folder / "config.json").read_text())
    assert doc["model_type"] == fam.model_type and doc["architectures"] == [fam.hf_class]
    assert doc["feed_forward_proj"] == fam.feed_forward_proj
    if config_style == "hub":
        assert doc["tie_word_embeddings"] is fam.tied and "scale_decoder_outputs" not in doc
    else:  # transformers 5.x forces the flag; T5/UMT5 keep the head's truth as the rescale flag
        assert doc["tie_word_embeddings"] is True
        assert doc.get("scale_decoder_outputs", fam.tied) is fam.tied

    model = hf_class(name).from_pretrained(str(folder), dtype=torch.float32)
    assert type(AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(str(folder)))) is hf_class(name)
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    head, shared = model.lm_head.weight, model.shared.weight
    assert ("lm_head.weight" in saved) is not fam.tied
    assert (head.data_ptr() == shared.data_ptr()) is fam.tied
    if not fam.tied:
        assert (head - shared).abs().mean() > 0.5  # a swapped head would show
    norms = [t for k, t in saved.items() if "layer_norm" in k]
    assert all(0.5 <= t.min() and t.max() <= 1.5 for t in norms) and not torch.equal(norms[0], norms[1])


@pytest.mark.parametrize("name", NAMES)
def test_each_family_has_its_feed_forward_bias_tables_and_head_scale(hf_family, name):
    fam = FAMILIES[name]
    model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_family(name)), dtype=torch.float32).eval()
    keys = model.state_dict().keys()
    ff = {k.rsplit(".", 2)[-2] for k in keys if ".DenseReluDense." in k}
    assert ff == ({"wi_0", "wi_1", "wo"} if fam.feed_forward_proj.startswith("gated") else {"wi", "wo"})
    assert model.config.dense_act_fn == {"relu": "relu", "gated-gelu": "gelu_new", "gated-silu": "silu"}[
        fam.feed_forward_proj]
    tables = [k for k in keys if "relative_attention_bias" in k]
    layers = SHAPE["num_layers"] + SHAPE["num_decoder_layers"]
    assert len(tables) == (layers if fam.bias_per_layer else 2)
    # The logits are the last decoder state times the head, rescaled by d_model ** -0.5 where tied.
    ids = torch.tensor([[5, 9, 17, 33, 4, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 7, 11]]), output_hidden_states=True)
    scale = SHAPE["d_model"] ** -0.5 if fam.tied else 1.0
    expected = out.decoder_hidden_states[-1] @ model.lm_head.weight.T * scale
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_each_family_has_its_sentinel_layout_and_room_for_the_mask(hf_family, name):
    fam = FAMILIES[name]
    folder = hf_family(name)
    ours = T5SentencePieceTokenizer(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert ours.sentinels_in_model is (fam.sentinels == "in-model")
    assert ours.num_sentinels == (fam.extra_ids or 100) and ours.hf_extra_ids == fam.extra_ids
    assert len(hf) == ours.vocab_size
    text = "The river <extra_id_0> the harvest <extra_id_1> yesterday."
    assert hf(text)["input_ids"] == ours.encode(text, add_eos=True)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert rows % 8 == 0 and ours.mask_id < rows < ours.mask_id + 9


def test_building_is_deterministic_per_seed(tmp_path, tiny_spm):
    a = load_file(build_hf_family("umt5", tmp_path / "a", tiny_spm, seed=1) / "model.safetensors")
    b = load_file(build_hf_family("umt5", tmp_path / "b", tiny_spm, seed=1) / "model.safetensors")
    c = load_file(build_hf_family("umt5", tmp_path / "c", tiny_spm, seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
