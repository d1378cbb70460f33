"""T5 attention pieces Megatron-Core lacks: the relative position bias and a core attention
that adds it.

What Megatron offers and why it is not used here:
- ``DotProductAttention`` (local) asserts ``attention_bias is None``; ``TEDotProductAttention``
  takes a bias only through Transformer Engine's fused backend (GPU only; which bias shapes and
  dtypes it accepts depends on the TE/cuDNN version, and it cannot be tested here), so
  :class:`T5CoreAttention` is used with or without TE. It calls
  ``torch.nn.functional.scaled_dot_product_attention`` with the bias as ``attn_mask`` and
  ``scale`` from the config (1.0 for T5): on GPUs that is a fused (memory-efficient) kernel that
  supports an additive bias and its gradient; on CPUs, the flash-attention CPU kernel.
- ``models.common.embeddings.RelativePositionEmbedding`` keeps the full ``[buckets, heads]``
  table on every TP rank and scatters the bias, so its backward all-gathers a
  ``[1, q, k, heads]`` tensor per stack per step. :class:`RelativePositionBias` instead shards
  the table by heads (``partition_dim=1``, like a column-parallel weight): each TP rank computes
  only its heads' bias and no communication is needed. At TP=1 the table is HF's
  ``relative_attention_bias.weight`` ``[num_buckets, n_heads]``.

The bias is computed once per stack and forward (:meth:`RelativePositionBias.attention_bias`
folds the padding or causal mask in too) and handed to every layer as its additive float
self-attention mask (``attention_mask``; see ``T5Stack.run`` for why not ``attention_bias``); the
bucket index tables are cached per (query length, key length, device). With sequence parallelism
the layers hold sequence shards, but core attention sees whole sequences (Megatron's QKV and KV
projections all-gather their input over TP), so the bias is built for the full lengths.

UMT5 (``model.relative_attention_per_layer``) gives every layer's self-attention a table of its
own: :class:`T5CoreAttention` then holds one (built with a :class:`RelativeBiasSpec`) and adds its
bias to the stack's additive mask (:func:`additive_attention_mask`), as HF's ``UMT5Attention``
adds it to the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import (
    divide,
    get_pg_size,
    make_tp_sharded_tensor_for_checkpoint,
)

from .norm import _param_device


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """HF T5's ``_relative_position_bucket``, operation for operation (same bucket boundaries)."""
    relative_buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


@dataclass(frozen=True)
class RelativeBiasSpec:
    """A relative-position bias table's bucketing: bidirectional (encoder) or causal (decoder)."""

    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128


def fold_masks(bias: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``bias`` ``[1, heads, q, k]`` with masked entries set to ``finfo.min`` (as HF): future keys
    when ``causal``, padded keys where ``key_padding_mask`` (bool ``[b, k]``, True = real) is False.
    Shape ``[1 or b, heads, q, k]``."""
    q_len, k_len = bias.shape[-2:]
    mask = None
    if causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=bias.device).triu_(1 + max(k_len - q_len, 0))[None, None]
    if key_padding_mask is not None:
        pad = ~key_padding_mask.to(device=bias.device, dtype=torch.bool)[:, None, None, :]
        mask = pad if mask is None else (mask | pad)
    if mask is None:
        return bias.contiguous()
    return bias.masked_fill(mask, torch.finfo(bias.dtype).min)


def additive_attention_mask(q_len: int, k_len: int, causal: bool, key_padding_mask: Optional[torch.Tensor],
                            dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """The masks alone as an additive ``[1 or b, 1, q, k]`` tensor (0 or ``finfo.min``), for layers
    that add their own position bias; None when nothing is masked."""
    if not causal and key_padding_mask is None:
        return None
    return fold_masks(torch.zeros(1, 1, q_len, k_len, dtype=dtype, device=device), causal, key_padding_mask)


class RelativePositionBias(MegatronModule):
    """One T5 relative-position bias table per stack, sharded over TP by heads.

    ``weight``: ``[num_buckets, heads / tp]``, allocated here and set by the model holding the
    stack (:mod:`spactor_mega.model.init`: this rank's heads of the full table).
    """

    def __init__(
        self,
        config: TransformerConfig,
        bidirectional: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config=config)
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.tp_group = tp_group
        self.heads_per_partition = divide(config.num_attention_heads, get_pg_size(tp_group))
        self.weight = torch.nn.Parameter(torch.empty(
            num_buckets, self.heads_per_partition, dtype=config.params_dtype, device=_param_device(config)
        ))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 1, 1)

    # Shared by every table of the same bucketing (not one per instance): UMT5's per-layer tables
    # then look up one index tensor, which autograd keeps once for the stack, not once per layer.
    _buckets: dict = {}

    def _bucket_table(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        key = (q_len, k_len, str(device), self.bidirectional, self.num_buckets, self.max_distance)
        table = self._buckets.get(key)
        if table is None:
            ctx = torch.arange(q_len, dtype=torch.long, device=device)[:, None]
            mem = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
            table = relative_position_bucket(
                mem - ctx, self.bidirectional, self.num_buckets, self.max_distance
            )
            if len(self._buckets) > 16:  # a few shapes in practice; do not grow without bound
                self._buckets.clear()
            self._buckets[key] = table
        return table

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """The position bias ``[1, heads / tp, q_len, k_len]`` (differentiable w.r.t. the table)."""
        buckets = self._bucket_table(q_len, k_len, self.weight.device)
        values = F.embedding(buckets, self.weight)  # [q, k, h]
        return values.permute(2, 0, 1).unsqueeze(0)

    def attention_bias(
        self,
        q_len: int,
        k_len: int,
        key_padding_mask: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """Position bias with the masks folded in, ready for :class:`T5CoreAttention`.

        ``key_padding_mask``: bool ``[b, k_len]``, True for real tokens (None: no padding).
        Causal (decoder) stacks also mask future keys. Masked entries get ``finfo.min`` as in HF.
        Shape ``[1 or b, heads / tp, q_len, k_len]``.
        """
        # Called as a module, not through .forward: Megatron's forward pre-hooks (the distributed
        # optimizer's overlapped parameter all-gather) must see the table used.
        bias = self(q_len, k_len)
        if dtype is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return fold_masks(bias, not self.bidirectional, key_padding_mask)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return {
            f"{prefix}weight": make_tp_sharded_tensor_for_checkpoint(
                self.weight,
                f"{prefix}weight",
                tp_axis=1,
                prepend_offsets=sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=_dp_cp_group(metadata),
            )
        }


def _dp_cp_group(metadata):
    if metadata and metadata.get("dp_cp_group") is not None:
        return metadata["dp_cp_group"]
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def additive_padding_mask(key_padding_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """bool ``[b, k]`` (True = real token) -> additive ``[b, 1, 1, k]`` (0 or finfo.min); None stays None."""
    if key_padding_mask is None:
        return None
    mask = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    mask.masked_fill_(~key_padding_mask.bool(), torch.finfo(dtype).min)
    return mask[:, None, None, :]


class T5CoreAttention(MegatronModule):
    """Core attention for T5: softmax(q k^T * scale + bias) v with SDPA; scale from the config.

    Built by Megatron's ``SelfAttention``/``CrossAttention`` (same constructor and forward as
    ``DotProductAttention``). Inputs ``[s, b, heads/tp, d_kv]``; output ``[s, b, heads/tp * d_kv]``.
    ``attention_mask`` is additive float (our stacks pass the position bias with the masks folded
    in, broadcastable to ``[b, heads/tp, sq, sk]``) or bool (True = masked out, Megatron's
    convention); ``attention_bias`` (additive) is added when given.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.arbitrary,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        position_bias: Optional[RelativeBiasSpec] = None,
        **_ignored,
    ):
        """``position_bias``: this layer's own relative-position bias table (UMT5); None: the
        stack's, folded into ``attention_mask`` by the stack."""
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("T5CoreAttention does not support context parallelism")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.relative_attention_bias: Optional[RelativePositionBias] = None
        if position_bias is not None:
            tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
            self.relative_attention_bias = RelativePositionBias(
                config, position_bias.bidirectional, position_bias.num_buckets, position_bias.max_distance,
                tp_group=tp_group,
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        **_ignored,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("T5CoreAttention does not support packed sequences (THD)")
        sq, b, heads, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        bias = attention_bias
        if self.relative_attention_bias is not None:  # this layer's own table (UMT5)
            own = self.relative_attention_bias(sq, key.size(0))
            bias = own if bias is None else bias + own
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                if bias is None:
                    bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(attention_mask, torch.finfo(q.dtype).min)
            else:
                bias = attention_mask if bias is None else bias + attention_mask
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP: each rank draws its own dropout mask (Megatron's convention;
            # with sequence parallelism the whole TransformerBlock already runs in this fork).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.softmax_scale
            )
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
