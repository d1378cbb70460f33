"""The parameters of D (a T5 of ``model``'s kind), G and the RTD head from the config alone: names and full shapes.

Names are those of our TP = 1 modules' state dicts (Megatron-Core's, as a checkpoint holds them
after :func:`spactor_mega.checkpoint.megatron.read_full_tensors`), shapes the full (unsharded)
ones. Pure Python: the dry run counts parameters from it and ``spactor convert to-hf`` checks a
checkpoint's tensors against it; no model is built.
"""

from __future__ import annotations

from math import prod

from spactor_mega.config import Config
from spactor_mega.plan.derived import generator_num_layers

Shapes = dict[str, tuple[int, ...]]


def _stack(prefix: str, m, layers: int, heads: int, d_ff: int, cross: bool) -> Shapes:
    """An encoder (``cross=False``) or decoder stack of ``m``'s kind (a
    :class:`~spactor_mega.config.ModelConfig`): pre-norm layers, a final RMSNorm and the relative
    position bias, one table for the stack or (UMT5) one per layer. Self-attention's Q, K, V are one
    fused weight; a gated feed-forward's two input projections are one ``linear_fc1``."""
    d, inner, buckets = m.d_model, heads * m.d_kv, m.relative_attention_num_buckets
    shapes: Shapes = {f"{prefix}.final_layernorm.weight": (d,)}
    if not m.relative_attention_per_layer:
        shapes[f"{prefix}.relative_attention_bias.weight"] = (buckets, heads)
    fc1_rows = d_ff if m.feed_forward == "relu" else 2 * d_ff
    for i in range(layers):
        p = f"{prefix}.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attention.linear_qkv.weight": (3 * inner, d),
            p + "self_attention.linear_proj.weight": (d, inner),
            p + "pre_mlp_layernorm.weight": (d,),
            p + "mlp.linear_fc1.weight": (fc1_rows, d),
            p + "mlp.linear_fc2.weight": (d, d_ff),
        })
        if m.relative_attention_per_layer:
            shapes[p + "self_attention.core_attention.relative_attention_bias.weight"] = (buckets, heads)
        if cross:
            shapes.update({
                p + "pre_cross_attn_layernorm.weight": (d,),
                p + "cross_attention.linear_q.weight": (inner, d),
                p + "cross_attention.linear_kv.weight": (2 * inner, d),
                p + "cross_attention.linear_proj.weight": (d, inner),
            })
    return shapes


def t5_parameter_shapes(model_cfg, vocab_rows: int) -> Shapes:
    """D's parameters (``model_cfg``: a :class:`~spactor_mega.config.ModelConfig`): shared
    embedding, encoder, decoder, and the LM head unless it is tied to the embedding, with
    ``vocab_rows`` (padded) vocabulary rows."""
    m = model_cfg
    shapes = {
        "embedding.weight": (vocab_rows, m.d_model),
        **_stack("encoder", m, m.num_encoder_layers, m.num_heads, m.d_ff, cross=False),
        **_stack("decoder", m, m.num_decoder_layers, m.num_heads, m.d_ff, cross=True),
    }
    if not m.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_rows, m.d_model)
    return shapes


def generator_parameter_shapes(cfg: Config) -> Shapes:
    """G's own parameters: an encoder stack of D's width and d_kv (its embedding and MLM head are D's
    embedding, shared, so not counted here)."""
    m, g = cfg.model, cfg.generator
    return _stack("encoder", m, generator_num_layers(cfg), g.num_heads or m.num_heads, g.d_ff or m.d_ff, cross=False)


def rtd_head_parameter_shapes(d_model: int) -> Shapes:
    """ELECTRA's discriminator head: dense d -> d (+ bias), GELU, dense d -> 1 (+ bias)."""
    return {"dense.weight": (d_model, d_model), "dense.bias": (d_model,), "out.weight": (1, d_model), "out.bias": (1,)}


def count(shapes: Shapes) -> int:
    return sum(prod(shape) for shape in shapes.values())
