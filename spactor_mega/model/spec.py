"""Megatron-Core ``ModuleSpec``s and ``TransformerConfig`` for T5 layers (v1.1 by default).

From Megatron-Core: ``TransformerLayer`` (pre-norm residual layer), ``SelfAttention`` /
``CrossAttention`` (fused QKV / Q + fused KV projections), ``ColumnParallelLinear`` /
``RowParallelLinear``, ``MLP`` (gated: ``gated_linear_unit``, fc1 holds [wi_0; wi_1], TP stride 2;
T5 v1.0's ReLU: fc1 is ``wi``), ``get_bias_dropout_add``. Ours:
:class:`~spactor_mega.model.norm.T5RMSNorm` (input, cross-attn and pre-MLP norms and the stack's
final norm) and :class:`~spactor_mega.model.attention.T5CoreAttention` (position bias, scale 1.0;
with UMT5's per-layer tables it holds its layer's own).

Why not ``megatron.core.models.T5.t5_spec``: its local block specs pass ``layer_norm=TENorm``,
which is ``None`` without Transformer Engine, so the final norm silently disappears; its layer
norms are LayerNorm-or-torch-RMSNorm wrappers; its ``DotProductAttention`` refuses a bias.

T5 mapped onto the config: no biases (``add_bias_linear=False``), the feed-forward of
``model.feed_forward`` (:data:`FEED_FORWARD_ACTIVATIONS`: gated-GELU with the tanh approximation =
HF ``gelu_new``, gated-SiLU, or ReLU ungated), ``softmax_scale=1.0``, RMSNorm eps from the model config,
``kv_channels=d_kv`` (may differ from ``d_model / heads``), dropout on the residual branches
(``hidden_dropout``) and attention probabilities (``attention_dropout``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .attention import RelativeBiasSpec, T5CoreAttention
from .norm import T5RMSNorm


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """HF ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


# model.feed_forward -> (Megatron's gated_linear_unit, activation_func), as HF's feed_forward_proj
# ("gated-gelu" is gelu_new there; "gated-silu" ACT2FN's silu; "relu" nn.ReLU on the ungated wi).
FEED_FORWARD_ACTIVATIONS = {
    "gated-gelu": (True, gelu_new),
    "gated-silu": (True, F.silu),
    "relu": (False, F.relu),
}


def _mlp_submodule():
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if hasattr(MLP, "as_mlp_submodule"):  # megatron-core >= 0.17: MLP builder protocol
        return partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)  # 0.16


def _self_attention(layer_bias: Optional[RelativeBiasSpec]):
    # Megatron calls the core-attention builder with its own arguments; a layer's own bias table
    # (UMT5) rides in a partial.
    core_attention = T5CoreAttention if layer_bias is None else partial(T5CoreAttention, position_bias=layer_bias)
    return ModuleSpec(
        module=SelfAttention,
        # The mask type is informational for our core attention: masks ride in the bias.
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
            q_layernorm=None,
            k_layernorm=None,
        ),
    )


def t5_encoder_layer_spec(layer_bias: Optional[RelativeBiasSpec] = None) -> ModuleSpec:
    """Pre-norm self-attention + FFN (T5 encoder layer; also G's layers). ``layer_bias``: the
    layer's own relative-position bias table (UMT5); None: the stack's, shared."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=T5RMSNorm,
            self_attention=_self_attention(layer_bias),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=T5RMSNorm,
            mlp=_mlp_submodule(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def t5_decoder_layer_spec(layer_bias: Optional[RelativeBiasSpec] = None) -> ModuleSpec:
    """The encoder layer plus pre-norm cross-attention (no position bias) between its self-attention
    (causal here: the decoder stack's mask says so) and its FFN."""
    encoder = t5_encoder_layer_spec(layer_bias)
    cross_attention = ModuleSpec(
        module=CrossAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_kv=ColumnParallelLinear,
            core_attention=T5CoreAttention,
            linear_proj=RowParallelLinear,
        ),
    )
    return dataclasses.replace(encoder, submodules=dataclasses.replace(
        encoder.submodules, pre_cross_attn_layernorm=T5RMSNorm, cross_attention=cross_attention,
        cross_attn_bda=get_bias_dropout_add,
    ))


def t5_transformer_config(
    model_cfg,
    *,
    num_layers: int,
    tensor_model_parallel_size: int = 1,
    d_ff: Optional[int] = None,
    num_heads: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    sequence_parallel: bool = False,
    **overrides,
) -> TransformerConfig:
    """A ``TransformerConfig`` for T5 layers of ``model_cfg`` (a :class:`ModelConfig`): D's
    stacks, and G's (its own ``d_ff``/``num_heads``, TP size 1). ``model_cfg.recompute`` selects
    Megatron's activation recompute (``full``: with ``recompute_method`` and ``recompute_num_layers``).
    ``sequence_parallel`` (needs TP > 1): Megatron's sequence parallelism; the layers then take and
    return this rank's sequence shard ``[s / tp, b, h]`` (norms and dropout on the shard, the
    column/row-parallel linears all-gather their input / reduce-scatter their output over TP).

    ``pipeline_model_parallel_size`` stays 1 here on purpose: Megatron's layer builders would
    split and renumber the layers by it; our stacks choose their stage's layers themselves.
    ``perform_initialization`` is off: Megatron's layers allocate their weights and draw nothing;
    the model sets every weight afterwards (:mod:`spactor_mega.model.init`), the same for any TP
    size. ``use_cpu_initialization`` (default: True without CUDA) only chooses where the weights
    are allocated (CPU, or the current GPU).
    """
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    heads = num_heads or model_cfg.num_heads
    gated, activation = FEED_FORWARD_ACTIVATIONS[model_cfg.feed_forward]
    recompute_granularity = None if model_cfg.recompute == "none" else model_cfg.recompute
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=model_cfg.d_model,
        ffn_hidden_size=d_ff or model_cfg.d_ff,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=model_cfg.d_kv,
        softmax_scale=1.0,
        hidden_dropout=model_cfg.dropout,
        attention_dropout=model_cfg.dropout,
        layernorm_epsilon=model_cfg.layer_norm_epsilon,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=gated,
        activation_func=activation,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_query_key_layer_scaling=False,
        gradient_accumulation_fusion=False,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=1,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=False,
        recompute_granularity=recompute_granularity,
    )
    if recompute_granularity == "full":
        # block: "the first N layers of the stack"; a stack with fewer layers recomputes them all
        layers = model_cfg.recompute_num_layers
        if model_cfg.recompute_method == "block":
            layers = min(layers, num_layers)
        kwargs.update(recompute_method=model_cfg.recompute_method, recompute_num_layers=layers)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
