"""Output heads of the SpacTor objective.

- :class:`RTDHead` (discriminator side, stage 1 only): ELECTRA's discriminator head on D's encoder
  output: dense ``d_model -> d_model`` (+bias), ``gelu_new``, dense ``d_model -> 1`` (+bias). It is
  a module of its own, not a child of D, so that (a) D is exactly what gets exported and (b) at
  tau the trainer drops it together with G (its own DDP wrapper/optimizer, or put with G's) and
  D's DDP buckets and optimizer state stay untouched. Replicated over TP (tiny); every TP rank
  computes it on the same replicated encoder output, so its gradients agree without
  communication. In a pipeline it belongs to the last stage (with D's losses).
- :class:`MLMHead` (generator side): the output projection tied to the shared, vocab-parallel
  token embedding: ``logits = hidden @ E^T``, each TP rank producing its vocabulary shard. The
  hidden state is replicated over TP, so its gradient is all-reduced over TP on the way back
  (Megatron's ``copy_to_tensor_model_parallel_region``), as in a column-parallel linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .norm import _param_device
from .spec import gelu_new


class RTDHead(MegatronModule):
    """Replaced-token-detection head: ``[s, b, h]`` -> logits ``[s, b]`` (fp32)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        d = config.hidden_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        # Read by Megatron's finalize_model_grads (on the last pipeline stage it looks for a
        # shared word embedding: the head has none).
        self.share_embeddings_and_output_weights = False
        self.pre_process = self.post_process = True
        self.dense = torch.nn.Linear(d, d, bias=True, dtype=torch.float32)
        self.out = torch.nn.Linear(d, 1, bias=True, dtype=torch.float32)
        with torch.no_grad():
            for lin in (self.dense, self.out):
                if config.perform_initialization:
                    config.init_method(lin.weight)  # default generator: same on every TP rank
                lin.bias.zero_()
        self.to(dtype=config.params_dtype, device=_param_device(config))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = gelu_new(self.dense(hidden))
        return self.out(x).squeeze(-1).float()


class MLMHead(torch.nn.Module):
    """Tied, vocab-parallel MLM projection (no parameters of its own)."""

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., h]`` (replicated over TP) -> logits ``[..., V/tp]``."""
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return F.linear(hidden, embedding_weight)
