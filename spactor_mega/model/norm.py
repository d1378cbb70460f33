"""T5's RMSNorm (``T5LayerNorm``), as a module Megatron's ``build_module`` can build.

Why our own and not Megatron's: the local (non-TE) choices are ``WrappedTorchNorm``
(``torch.nn.RMSNorm``, which normalises in the input dtype, so bf16 activations would be squared
and averaged in bf16 where HF T5 uses fp32) and Apex's ``FusedLayerNorm`` (Apex is not on PyPI);
``TENorm`` is GPU-only and ``None`` without Transformer Engine, and which fused options exist
differs between Megatron 0.16 and 0.19. This one computes exactly what HF does:
``w * (x * rsqrt(mean(x^2) + eps))`` with the statistics in fp32, no bias, no mean subtraction.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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
        x = hidden_states.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        x = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _param_device(config: TransformerConfig):
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
