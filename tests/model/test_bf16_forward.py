"""D in bf16 beside D in fp32 (TP = 1, one process, the same weights) for the T5 variants an import
brings: T5 v1.0's ReLU feed-forward with the tied, d_model**-0.5-rescaled head, the UL2-style
gated-SiLU feed-forward, and UMT5's bias table per layer.

Tolerance: the norm-wise relative error of the bf16 encoder states and logits against fp32. bf16
keeps 8 significant bits (unit roundoff u = 2**-8 = 3.9e-3); every matmul input, norm output and
residual sum on the way is rounded once, so errors of a few u are expected: measured 0.5-0.9 %
(2 + 2 layers, T5 init), the same as the default T5 v1.1 D (gated-GELU, untied, shared tables),
which test_bf16.py trains in bf16. Bound: 8 u = 3.1e-2, and at most 1.5 x the v1.1 D's error on the
same inputs (measured 0.7-1.0 x), so a variant whose bf16 path loses more than the default's fails.
"""

import dataclasses

import pytest
import torch

from spactor_mega.parallel.state import single_process_parallel

VOCAB = 256
U = 2.0**-8  # bf16's unit roundoff
VARIANTS = {
    "relu_tied": dict(feed_forward="relu", tie_word_embeddings=True),
    "gated_silu": dict(feed_forward="gated-silu"),
    "per_layer_bias": dict(relative_attention_per_layer=True, hf_model_type="umt5"),
}


@pytest.fixture(scope="module")
def parallel():
    with single_process_parallel(seed=1234):
        yield


def _relative_errors(**variant) -> dict[str, float]:
    """{"encoder": ..., "logits": ...}: bf16 D against fp32 D with the same (fp32-initialised) weights."""
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.model.t5 import T5Discriminator

    model_cfg = dataclasses.replace(tiny_config().model, init="t5", **variant)
    fp32 = T5Discriminator(model_cfg, VOCAB).eval()
    bf16 = T5Discriminator(model_cfg, VOCAB, params_dtype=torch.bfloat16).eval()
    bf16.load_state_dict(fp32.state_dict())  # the fp32 weights rounded to bf16
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    b = synthetic_batch(3, 40, 9, sp_size=150, seed=1, pad_rows=1)  # one row with padding
    with torch.no_grad():
        want = fp32(b["enc_tokens"], b["dec_input"], b["enc_mask"])
        have = bf16(b["enc_tokens"], b["dec_input"], b["enc_mask"])
    assert have.lm_logits.dtype == torch.bfloat16
    return {name: ((h.float() - w).norm() / w.norm()).item()
            for name, h, w in (("encoder", have.encoder_hidden, want.encoder_hidden),
                               ("logits", have.lm_logits, want.lm_logits))}


@pytest.fixture(scope="module")
def default_errors(parallel):
    return _relative_errors()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_forward_follows_fp32(parallel, default_errors, variant):
    errors = _relative_errors(**VARIANTS[variant])
    print(variant, errors, "T5 v1.1:", default_errors)
    for name, error in errors.items():
        assert 0 < error <= 8 * U, (name, error)
        assert error <= 1.5 * default_errors[name], (name, error, default_errors[name])
