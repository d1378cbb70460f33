"""A randomly initialised HF T5 v1.1 folder, as a hub download holds it (weights, config, tokenizer);
and a briefly trained SpacTor run, shared by the tests that export it."""

import pytest

from tests.training.test_training import run, tiny_config


@pytest.fixture(scope="session")
def random_hf_t5(hf_family):
    """tests/hf_families.py's T5 v1.1 (also Flan-T5): 3 + 2 layers, d_model 32, d_ff 48, untied head."""
    return hf_family("t5-v1_1")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(config, result) of a 40-step run on the demo corpus (tau 20, evaluated at steps 0 and 40, its
    metrics file written): one launch for every test of this folder that exports a trained model."""
    work = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_config(work, train__steps=40, spactor__tau=20, train__eval_interval=40,
                      logging__metrics_file=str(work / "metrics.jsonl"))
    return cfg, run(cfg)
