"""Output heads of the SpacTor objective.

- :class:`RTDHead` (discriminator side, stage 1 only): ELECTRA's discriminator head on D's encoder
  output: dense ``d_model -> d_model`` (+bias), ``gelu_new``, dense ``d_model -> 1`` (+bias). It is
  a module of its own, not a child of D, so that (a) D is exactly what gets exported and (b) at
  tau the trainer drops it together with G (its own DDP wrapper/optimizer, or put with G's) and
  D's DDP buckets and optimizer state stay untouched. Replicated over TP (tiny); every TP rank
  computes it on the same replicated encoder output, so its gradients agree without
  communication. Under sequence parallelism each TP rank computes it on its own sequence shard
  and the logits are all-gathered (1 / TP of the head's work per rank); its weights are then
  marked ``sequence_parallel``, like the norms, so Megatron's ``finalize_model_grads`` sums their
  gradients over TP. In a pipeline it belongs to the last stage (with D's losses).
- :class:`MLMHead` (generator side): the output projection tied to the shared, vocab-parallel
  token embedding: ``logits = (hidden * scale) @ E^T`` (``scale`` d_model^-1/2 under
  ``model.init: t5``, whose embedding has std 1, as T5's tied heads; else 1), each TP rank
  producing its vocabulary shard. The hidden state is replicated over TP, so its gradient is
  all-reduced over TP on the way back (Megatron's ``copy_to_tensor_model_parallel_region``), as in
  a column-parallel linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .init import initialize_rtd_head
from .norm import _param_device
from .spec import gelu_new


class RTDHead(MegatronModule):
    """Replaced-token-detection head: ``[s, b, h]`` -> logits ``[s, b]`` (fp32). Weights:
    ``init_scheme`` (``model.init``) seeded by ``init_seed``, the same on every TP rank."""

    def __init__(self, config: TransformerConfig, *, init_scheme: str, init_seed: int):
        super().__init__(config=config)
        d = config.hidden_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        # Read by Megatron's finalize_model_grads (on the last pipeline stage it looks for a
        # shared word embedding: the head has none).
        self.share_embeddings_and_output_weights = False
        self.pre_process = self.post_process = True
        # skip_init: torch's own draw would be discarded (and advance the default generator).
        self.dense = torch.nn.utils.skip_init(torch.nn.Linear, d, d, bias=True, dtype=config.params_dtype,
                                              device=_param_device(config))
        self.out = torch.nn.utils.skip_init(torch.nn.Linear, d, 1, bias=True, dtype=config.params_dtype,
                                            device=_param_device(config))
        initialize_rtd_head(self, init_scheme, init_seed)
        for p in self.parameters():  # read by finalize_model_grads when config.sequence_parallel
            p.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` (this rank's sequence shard under sequence parallelism) -> ``[s, b]``
        logits of the whole sequence."""
        logits = self.out(gelu_new(self.dense(hidden))).squeeze(-1).float()
        if self.config.sequence_parallel:
            # The RTD loss is computed whole on every TP rank (the same gradient everywhere): the
            # gather's backward keeps this rank's part instead of summing over TP.
            logits = tensor_parallel.gather_from_sequence_parallel_region(
                logits, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return logits


class MLMHead(torch.nn.Module):
    """Tied, vocab-parallel MLM projection (no parameters of its own); ``scale`` multiplies the
    hidden state (:func:`spactor_mega.model.init.tied_logits_scale`)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., h]`` (replicated over TP) -> logits ``[..., V/tp]``."""
        if self.scale != 1.0:
            hidden = hidden * self.scale
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return F.linear(hidden, embedding_weight)
