"""T5's RMSNorm (``T5LayerNorm``), as a module Megatron's ``build_module`` can build.

Why our own and not Megatron's: the local (non-TE) choices are ``WrappedTorchNorm``
(``torch.nn.RMSNorm``, which normalises in the input dtype, so bf16 activations would be squared
and averaged in bf16 where HF T5 uses fp32) and Apex's ``FusedLayerNorm`` (Apex is not on PyPI);
``TENorm`` is GPU-only and ``None`` without Transformer Engine, and which fused options exist
differs between Megatron 0.16 and 0.19. This one computes exactly what HF does:
``w * (x * rsqrt(mean(x^2) + eps))`` with the statistics in fp32, no bias, no mean subtraction.

Why a hand-written backward (:class:`_T5RMSNormFunction`): HF's forward under autograd keeps the
input, the normalised activations and, for bf16 inputs, an fp32 copy of the input for ``pow``:
8 bytes per element in bf16 (fp32: 8 as well), in four norms per decoder layer. The function
keeps the input (its own dtype) and the fp32 inverse RMS per row only (bf16: 2 bytes per element
plus 4 per row) and recomputes the rest in backward, with the same operations in the same order
as autograd's backward of HF's forward, so the gradients equal it (tests/model/test_norm.py).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_HALF = (torch.float16, torch.bfloat16)


def _normalised(x: torch.Tensor, inv_rms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """HF's ``x * rsqrt(variance + eps)`` (fp32), cast to the weight's dtype when it is fp16/bf16."""
    normed = x * inv_rms
    return normed.to(dtype) if dtype in _HALF else normed


class _T5RMSNormFunction(torch.autograd.Function):
    """``weight * normalised(x)``, saving ``x``, ``weight`` and the fp32 ``inv_rms`` per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * _normalised(x, inv_rms, weight.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Autograd's backward of HF's forward, step by step (same ops, same order, same casts).
        x, weight, inv_rms = ctx.saved_tensors
        normed = _normalised(x, inv_rms, weight.dtype)
        grad_weight = (grad_out * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        grad_normed = (grad_out * weight).float()  # through the cast to the weight's dtype
        grad_direct = grad_normed * inv_rms  # d(x * inv_rms) / dx
        grad_inv_rms = (grad_normed * x).sum(-1, keepdim=True)
        grad_variance = -0.5 * grad_inv_rms * inv_rms.pow(3)  # rsqrt's backward
        grad_square = grad_variance.expand(x.shape) / x.shape[-1]  # mean's backward
        grad_pow = grad_square * (2.0 * x.float().pow(1.0))  # pow(2)'s backward
        # Autograd casts each path's gradient to x's dtype, then sums them.
        return grad_direct.to(x.dtype) + grad_pow.to(x.dtype), grad_weight, None


class T5RMSNorm(MegatronModule):
    """``T5LayerNorm``: scale-only RMS normalisation, statistics in fp32 (replicated over TP)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_ignored):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        # Megatron all-reduces the grads of params marked so when sequence parallelism is on.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _T5RMSNormFunction.apply(hidden_states, self.weight, self.eps)


def _param_device(config: TransformerConfig):
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
