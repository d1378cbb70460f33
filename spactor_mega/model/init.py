"""Weight initialisation of D, G and the RTD head (``model.init``): every parameter is a function
of (``train.seed``, part, global layer index, tensor name), whatever the TP/PP layout and device.

Why not Megatron's own: on GPUs (``use_cpu_initialization`` off) its layers draw each TP shard
under the per-TP-rank CUDA RNG tracker, so TP = 2 starts from other weights than TP = 1; on its
CPU path they draw full tensors from the default generator in build order, so a pipeline stage's
weights depend on what was built before it. Our Megatron layers are built with
``perform_initialization=False`` (Megatron draws nothing), and then every parameter is set here:
the full TP = 1 tensor is drawn on the CPU from a ``torch.Generator`` of its own, seeded by
``seed_from(seed, part, layer, crc32(name))``, and this rank keeps its TP shard exactly as
Megatron's ``_initialize_affine_weight_cpu`` does (``size / (tp * partition_stride)`` chunks along
``partition_dim``, rank ``r`` taking chunks ``r, r + tp, ...``). A parameter that fuses several HF
T5 tensors (``linear_qkv`` = q, k, v per head; ``linear_kv`` = k, v per head; ``linear_fc1`` =
[wi_0; wi_1], or T5 v1.0's ungated ``wi``; the layouts of :mod:`spactor_mega.model.hf_mapping`) is
drawn per HF tensor, each with its own scale and key, then fused. UMT5's per-layer bias tables are
keyed by their layer; a tied head's copy on a later pipeline stage is the embedding's own draw. A
parameter without a rule here is refused.

Schemes:

- ``megatron`` (what Megatron's ``TransformerConfig`` does by default): N(0, ``init_method_std``)
  for the embedding, q/k/v, fc1, LM head, relative-bias tables and RTD head; N(0,
  ``init_method_std / sqrt(2 * layers of the stack)``) for the output layers (``linear_proj``,
  ``linear_fc2``; Megatron's ``scaled_init_method_normal``); RMSNorm weights 1, biases 0.
- ``t5`` (mesh-tensorflow / HF ``T5PreTrainedModel._init_weights``, factor 1): embedding std 1;
  q (d_model d_kv)^-1/2, k and v d_model^-1/2, o (heads d_kv)^-1/2, in self- and cross-attention;
  wi (ungated), wi_0 and wi_1 d_model^-1/2, wo d_ff^-1/2 (G: its own heads and d_ff); relative-bias tables
  d_model^-1/2; RMSNorm weights 1. On unit-RMS (normalised) inputs this gives attention logits of
  std ~1 at any width: T5 has no 1/sqrt(d_kv) softmax scale, the q scale carries it. The untied LM
  head follows T5X / mesh-tensorflow (its ``logits_dense`` is variance_scaling(1.0, fan_in), std
  d_model^-1/2), not HF's std 1: with std 1 the initial logits of the unit-RMS decoder output
  would have std ~sqrt(d_model) (~28 at d_model 768) and the initial loss would sit far above
  log V. G's tied MLM head reads the embedding (std 1), so it scales its input by d_model^-1/2 as
  T5 does for tied heads (:func:`tied_logits_scale`). The RTD head: fan-in std d_model^-1/2
  (dense and out), biases 0.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.utils import get_pg_rank, get_pg_size

from spactor_mega.config import INIT_SCHEMES
from spactor_mega.parallel.tensor_shards import split_tp_tensor
from spactor_mega.seeding import seed_from

from .hf_mapping import LAYER_BIAS, _join_grouped

# Each part's number in the seed key (fixed: changing one changes that part's weights).
PARTS = {"embedding": 1, "encoder": 2, "decoder": 3, "lm_head": 4, "generator": 5, "rtd_head": 6}
OUTSIDE_LAYERS = -1  # the layer index in the key of tensors in no layer (bias tables, final norms, heads)

# A layer's weight matrices: (block, the HF T5 tensors the parameter holds, in hf_mapping's layout).
# Several tensors of an attention block are grouped per head; fc1's are stacked ([wi_0; wi_1]).
_LAYER_WEIGHTS = {
    "self_attention.linear_qkv.weight": ("self_attention", ("q", "k", "v")),
    "self_attention.linear_proj.weight": ("self_attention", ("o",)),
    "cross_attention.linear_q.weight": ("cross_attention", ("q",)),
    "cross_attention.linear_kv.weight": ("cross_attention", ("k", "v")),
    "cross_attention.linear_proj.weight": ("cross_attention", ("o",)),
    "mlp.linear_fc1.weight": ("mlp", ("wi_0", "wi_1")),  # ("wi",) in an ungated (T5 v1.0) MLP
    "mlp.linear_fc2.weight": ("mlp", ("wo",)),
}
_LAYER_NORMS = ("input_layernorm.weight", "pre_cross_attn_layernorm.weight", "pre_mlp_layernorm.weight")



def tied_logits_scale(scheme: str, d_model: int) -> float:
    """The factor on the hidden state of a head tied to the embedding: T5's d_model**-0.5 under
    ``t5`` (the embedding has std 1: unscaled logits of a unit-RMS hidden state would have std
    ~sqrt(d_model)), 1 under ``megatron`` (embedding std ``init_method_std``)."""
    return d_model**-0.5 if scheme == "t5" else 1.0


def mark_tensor_parallel(module: torch.nn.Module) -> None:
    """Marks the weights of ``module``'s Megatron TP layers (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``) as Megatron does when it initialises them.

    Megatron sets these marks only inside its init functions, so layers built with
    ``perform_initialization=False`` have none (Megatron-Bridge works around the same gap by
    keeping initialisation on, NVIDIA-NeMo/Megatron-Bridge#992); the optimizer's grad norm, shard
    gathering and the sharding below read them. Column-parallel layers and the vocab-parallel
    embedding split dim 0, row-parallel dim 1; a gated MLP's fc1 has stride 2, as Megatron's
    ``MLP`` builds it (each rank holds ``[gate_r; up_r]``). Weights already marked are left alone.
    """
    gated_fc1 = {id(m.linear_fc1) for m in module.modules() if isinstance(m, MLP) and m.config.gated_linear_unit}
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(m, RowParallelLinear):
            dim = 1
        else:
            continue
        if m.weight is not None and not hasattr(m.weight, "partition_dim"):
            set_tensor_model_parallel_attributes(m.weight, True, dim, 2 if id(m) in gated_fc1 else 1)


def _normal(seed: int, part: str, layer: int, name: str, shape: tuple, std: float) -> torch.Tensor:
    """N(0, std) of ``shape`` (fp32, CPU) from a generator keyed by (seed, part, layer, name)."""
    generator = torch.Generator().manual_seed(seed_from(seed, PARTS[part], layer, zlib.crc32(name.encode())))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def _layer_stds(scheme: str, config) -> dict:
    """Std of each HF T5 tensor of a stack's layers (and of its bias table) under ``scheme``."""
    d, d_kv, heads, d_ff = config.hidden_size, config.kv_channels, config.num_attention_heads, config.ffn_hidden_size
    if scheme == "t5":
        return {"q": (d * d_kv) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": (heads * d_kv) ** -0.5,
                "wi": d**-0.5, "wi_0": d**-0.5, "wi_1": d**-0.5, "wo": d_ff**-0.5, "relative_attention_bias": d**-0.5}
    std = config.init_method_std
    output = std / math.sqrt(2.0 * config.num_layers)  # Megatron's scaled_init_method_normal
    return {"q": std, "k": std, "v": std, "o": output, "wi": std, "wi_0": std, "wi_1": std, "wo": output,
            "relative_attention_bias": std}


def _hf_shape(tensor: str, config) -> tuple:
    d, inner, d_ff = config.hidden_size, config.num_attention_heads * config.kv_channels, config.ffn_hidden_size
    return {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner),
            "wi": (d_ff, d), "wi_0": (d_ff, d), "wi_1": (d_ff, d), "wo": (d, d_ff)}[tensor]


def _stack_tensor(stack, name: str, scheme: str, seed: int, part: str) -> Optional[torch.Tensor]:
    """The full tensor of a :class:`~spactor_mega.model.t5.T5Stack` parameter ``name`` (relative to
    the stack, with the global layer index: ``layers.<k>.<rest>``); None for a name without a rule."""
    config = stack.config
    if name == "final_layernorm.weight":
        return torch.ones(config.hidden_size)
    stds = _layer_stds(scheme, config)
    if name == "relative_attention_bias.weight":
        shape = (stack.num_buckets, config.num_attention_heads)
        return _normal(seed, part, OUTSIDE_LAYERS, name, shape, stds["relative_attention_bias"])
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if head != "layers" or not index.isdigit():
        return None
    if rest in _LAYER_NORMS:
        return torch.ones(config.hidden_size)
    if rest == LAYER_BIAS:
        shape = (stack.num_buckets, config.num_attention_heads)
        return _normal(seed, part, int(index), LAYER_BIAS, shape, stds["relative_attention_bias"])
    if rest not in _LAYER_WEIGHTS:
        return None
    block, tensors = _LAYER_WEIGHTS[rest]
    if rest == "mlp.linear_fc1.weight" and not config.gated_linear_unit:
        tensors = ("wi",)
    drawn = [_normal(seed, part, int(index), f"{block}.{t}", _hf_shape(t, config), stds[t]) for t in tensors]
    if len(drawn) == 1:
        return drawn[0]
    return torch.cat(drawn) if block == "mlp" else _join_grouped(drawn, config.num_attention_heads)


@torch.no_grad()
def _initialize(module: torch.nn.Module, scheme: str, full_tensor: Callable[[str], Optional[torch.Tensor]],
                global_name: Callable[[str], str] = str, tp_group=None) -> None:
    """Sets every parameter of ``module`` to its TP shard of ``full_tensor(global name)`` (None:
    no rule for that name, refused)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    rank, world = get_pg_rank(tp_group), get_pg_size(tp_group)
    for name, param in module.named_parameters():
        full = full_tensor(global_name(name))
        if full is None:
            raise KeyError(f"no initialisation rule for parameter {global_name(name)!r} (spactor_mega/model/init.py)")
        if getattr(param, "tensor_model_parallel", False):
            full = split_tp_tensor(full, param.partition_dim, param.partition_stride, rank, world)
        if full.shape != param.shape:
            raise ValueError(f"{name}: the drawn shard is {tuple(full.shape)} but the parameter {tuple(param.shape)}")
        param.copy_(full)


def initialize_discriminator(d, scheme: str, seed: int) -> None:
    """D's parameters (this stage's, this TP rank's shards), by global name."""
    m = d.model_cfg
    head_std = {"embedding.weight": 1.0 if scheme == "t5" else m.init_method_std,
                "lm_head.weight": m.d_model**-0.5 if scheme == "t5" else m.init_method_std}

    def full_tensor(name: str) -> Optional[torch.Tensor]:
        if name == "lm_head.weight" and m.tie_word_embeddings:
            name = "embedding.weight"  # a later stage's copy of the tied embedding: the same draw
        if name in head_std:
            part = name.split(".")[0]
            return _normal(seed, part, OUTSIDE_LAYERS, name, (d.vocab_size, m.d_model), head_std[name])
        stack, _, rest = name.partition(".")
        return _stack_tensor(getattr(d, stack), rest, scheme, seed, stack) if stack in ("encoder", "decoder") else None

    _initialize(d, scheme, full_tensor, d.global_parameter_name, d.tp_group)


def initialize_generator(g, scheme: str, seed: int) -> None:
    """G's parameters (whole on every TP rank: its layers are not split)."""

    def full_tensor(name: str) -> Optional[torch.Tensor]:
        stack, _, rest = name.partition(".")
        return _stack_tensor(g.encoder, rest, scheme, seed, "generator") if stack == "encoder" else None

    _initialize(g, scheme, full_tensor, tp_group=g.tp_group)


def initialize_rtd_head(head, scheme: str, seed: int) -> None:
    """The RTD head's parameters (replicated over TP)."""
    d = head.config.hidden_size
    std = d**-0.5 if scheme == "t5" else head.config.init_method_std
    weights = {"dense.weight": (d, d), "out.weight": (1, d)}
    biases = {"dense.bias": d, "out.bias": 1}

    def full_tensor(name: str) -> Optional[torch.Tensor]:
        if name in weights:
            return _normal(seed, "rtd_head", OUTSIDE_LAYERS, name, weights[name], std)
        return torch.zeros(biases[name]) if name in biases else None

    _initialize(head, scheme, full_tensor)


@torch.no_grad()
def attention_logit_std(d, tokens: torch.Tensor) -> float:
    """The std of D's first encoder layer's self-attention logits (q.k times the softmax scale,
    before the position bias) on ``tokens`` ``[b, s]``: what the schemes differ in (TP = 1)."""
    layer = d.encoder.layers[0]
    attention = layer.self_attention
    q, k, _ = attention.get_query_key_value_tensors(layer.input_layernorm(d.embed(tokens)))  # [s, b, h, d_kv]
    logits = torch.einsum("sbhd,tbhd->bhst", q.float(), k.float()) * attention.core_attention.softmax_scale
    return logits.std().item()
