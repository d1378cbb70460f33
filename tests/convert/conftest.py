"""A randomly initialised HF T5 v1.1 folder, as a hub download holds it (weights, config, tokenizer)."""

import pytest


@pytest.fixture(scope="session")
def random_hf_t5(hf_family):
    """tests/hf_families.py's T5 v1.1 (also Flan-T5): 3 + 2 layers, d_model 32, d_ff 48, untied head."""
    return hf_family("t5-v1_1")
