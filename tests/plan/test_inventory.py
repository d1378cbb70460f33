"""The config-only parameter inventory names and shapes exactly what the built modules hold, for
every model family; D's count is also that of Hugging Face's model of the same config."""

import pytest
import torch

from spactor_mega.plan.dry_run import parameter_counts
from spactor_mega.plan.inventory import generator_parameter_shapes, rtd_head_parameter_shapes, t5_parameter_shapes
from tests.plan.test_flops import FAMILIES, family_config


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


@pytest.mark.parametrize("family", FAMILIES)
def test_inventory_is_what_the_modules_hold(family):
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import single_process_parallel

    cfg = family_config(family, num_encoder_layers=3, num_decoder_layers=1)
    cfg.generator.num_heads, cfg.generator.d_ff = 1, 40  # G narrower than D: its own sizes are used
    vocab = 208
    with single_process_parallel():
        d, g, rtd = build_spactor_modules(cfg, vocab)
    assert _shapes(d) == t5_parameter_shapes(cfg.model, vocab)
    assert _shapes(g) == generator_parameter_shapes(cfg)
    assert _shapes(rtd) == rtd_head_parameter_shapes(cfg.model.d_model)
    built = {name: sum(p.numel() for p in m.parameters()) for name, m in
             (("discriminator", d), ("generator", g), ("rtd_head", rtd))}
    assert parameter_counts(cfg, vocab) == built


@pytest.mark.parametrize("family", FAMILIES)
def test_discriminator_count_is_hugging_faces(family):
    """HF's T5/MT5/UMT5ForConditionalGeneration of the same config: as many distinct parameters
    (a tied head is its shared embedding, an untied one a matrix of its own)."""
    from spactor_mega.model.hf_mapping import build_hf_model

    cfg = family_config(family, num_encoder_layers=3, num_decoder_layers=2)
    vocab = 256
    hf = build_hf_model(cfg.model, vocab)
    assert parameter_counts(cfg, vocab)["discriminator"] == sum(p.numel() for p in hf.parameters())


def test_dry_run_of_a_t5_v1_0_names_its_kind_and_counts_it():
    """`spactor train --config configs/t5-base.yaml --dry-run` with T5 v1.0's options from the
    command line: the kind line, and D counted without an LM head of its own and with a 2-matrix
    feed-forward (the build and HF tests above check those counts)."""
    import contextlib
    import io
    from pathlib import Path

    from spactor_mega.cli import main
    from spactor_mega.config import load_yaml

    preset = Path(__file__).resolve().parents[2] / "configs" / "t5-base.yaml"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "--config", str(preset), "--dry-run", "--model.feed_forward", "relu",
                     "--model.tie_word_embeddings", "true"]) == 0
    text = out.getvalue()
    assert ("model: feed-forward relu, LM head tied to the embedding (decoder output x d_model**-0.5), "
            "relative position bias one per stack, HF model type t5") in text
    cfg = load_yaml(preset)
    untied_gated = parameter_counts(cfg, 32128)["discriminator"]
    d, ff, layers = cfg.model.d_model, cfg.model.d_ff, cfg.model.num_encoder_layers + cfg.model.num_decoder_layers
    v1_0 = untied_gated - 32128 * d - layers * d * ff  # no head of its own, wi instead of wi_0 and wi_1
    assert f"parameters (vocab 32128): D {v1_0 / 1e6:,.1f}M," in text
