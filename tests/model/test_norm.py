"""T5RMSNorm's own backward: the same outputs and gradients as HF's ``T5LayerNorm`` under
autograd (fp32 and bf16), and fewer bytes kept for backward (measured with saved_tensors_hooks)."""

import pytest
import torch

from spactor_mega.model.norm import T5RMSNorm
from spactor_mega.model.spec import t5_transformer_config
from spactor_mega.model.synthetic import tiny_config
from tests.autograd_bytes import saved_bytes

S, B, H = 16, 3, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``T5LayerNorm.forward`` (the implementation T5RMSNorm replaced), differentiated by autograd."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


def make_norm(dtype: torch.dtype) -> T5RMSNorm:
    config = t5_transformer_config(tiny_config(d_model=H).model, num_layers=1, params_dtype=dtype,
                                   use_cpu_initialization=True)
    norm = T5RMSNorm(config, H, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, H, dtype=torch.float32))  # not all ones: a lost weight shows
    return norm


def inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(S, B, H, generator=gen) * torch.linspace(0.1, 3.0, S)[:, None, None]).to(dtype)
    grad = torch.randn(S, B, H, generator=gen).to(dtype)
    return x, grad


@pytest.mark.parametrize("precision", list(DTYPES))
def test_outputs_and_gradients_equal_hf_autograd(precision):
    dtype = DTYPES[precision]
    norm = make_norm(dtype)
    for seed in range(3):
        x, grad = inputs(dtype, seed)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = norm(x_ours)
        ours.backward(grad)
        weight_grad, norm.weight.grad = norm.weight.grad, None
        ref = hf_forward(x_ref, norm.weight, norm.eps)
        ref.backward(grad)
        assert ours.dtype == ref.dtype == dtype
        for got, want in ((ours, ref), (x_ours.grad, x_ref.grad), (weight_grad, norm.weight.grad)):
            assert (got.float() - want.float()).abs().max() <= 1e-6, precision
        norm.weight.grad = None


@pytest.mark.parametrize("precision, per_element", [("fp32", 4), ("bf16", 2)])
def test_keeps_the_input_and_the_inverse_rms_only(precision, per_element):
    dtype = DTYPES[precision]
    norm = make_norm(dtype)
    x = inputs(dtype)[0].requires_grad_()
    ours = saved_bytes(lambda: norm(x), norm.parameters())
    ref = saved_bytes(lambda: hf_forward(x, norm.weight, norm.eps), norm.parameters())
    rows = S * B
    assert ours == per_element * S * B * H + 4 * rows  # the input in its dtype + fp32 inverse RMS per row
    assert ref == 8 * S * B * H + 4 * rows  # fp32: input + normalised; bf16: fp32 copy + input + normalised
    assert ours < ref


def test_no_grad_for_the_weight_or_the_input():
    norm = make_norm(torch.float32)
    norm.weight.requires_grad_(False)
    x, grad = inputs(torch.float32)
    x.requires_grad_()
    norm(x).backward(grad)
    ref = x.detach().clone().requires_grad_()
    hf_forward(ref, norm.weight, norm.eps).backward(grad)
    assert torch.equal(x.grad, ref.grad) and norm.weight.grad is None
    norm.weight.requires_grad_(True)
    out = norm(x.detach())
    out.backward(grad)
    assert norm.weight.grad is not None
