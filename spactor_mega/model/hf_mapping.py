"""Weight mapping between D's TP=1 state dict and the HF T5 family: ``T5ForConditionalGeneration``
(T5 v1.0 and v1.1, Flan-T5, UL2-style gated-SiLU), ``MT5ForConditionalGeneration`` and
``UMT5ForConditionalGeneration`` (``model.hf_model_type``).

Megatron layouts handled here (TP=1, i.e. full tensors; for TP>1 gather first, e.g. with
``dist_checkpointing`` or :func:`spactor_mega.parallel.tensor_shards.gather_full_state_dict`):

- self-attention ``linear_qkv.weight`` ``[heads * 3 * d_kv, d_model]``: grouped per head (one
  query group per head), each group ``[q_h; k_h; v_h]`` -> HF ``q``, ``k``, ``v`` ``[heads*d_kv, d_model]``;
- cross-attention ``linear_q.weight`` is HF ``q`` as is; ``linear_kv.weight``
  ``[heads * 2 * d_kv, d_model]`` grouped per head ``[k_h; v_h]`` -> HF ``k``, ``v``;
- gated feed-forwards: ``mlp.linear_fc1.weight`` ``[2 * d_ff, d_model]`` = ``[wi_0; wi_1]``; T5
  v1.0's ReLU: ``linear_fc1`` = ``wi``; ``linear_fc2`` = ``wo``;
- one ``relative_attention_bias.weight`` ``[buckets, heads]`` per stack -> HF's block 0 of that
  stack; UMT5: each layer's ``self_attention.core_attention.relative_attention_bias.weight`` ->
  that block's ``SelfAttention.relative_attention_bias.weight``;
- ``embedding.weight`` -> ``shared.weight`` (HF ties ``encoder/decoder.embed_tokens`` to it);
  ``lm_head.weight`` untied, or with a tied head (v1.0) ``shared.weight`` itself (HF ties it).

Megatron's ``_extra_state`` entries are ignored. The vocabulary is carried over row for row;
``hf_vocab_size`` may cut (or zero-pad) rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from spactor_mega.data.special_tokens import EOS_ID, PAD_ID


# The helpers below return views where they can (callers copy once, at the end).
def _split_grouped(w: torch.Tensor, heads: int, parts: int) -> list[torch.Tensor]:
    d_in = w.shape[-1]
    g = w.reshape(heads, parts, -1, d_in)
    return [g[:, i].reshape(-1, d_in) for i in range(parts)]


def _join_grouped(ws: list[torch.Tensor], heads: int) -> torch.Tensor:
    d_in = ws[0].shape[-1]
    return torch.stack([w.reshape(heads, -1, d_in) for w in ws], dim=1).reshape(-1, d_in)


def _resize_rows(w: torch.Tensor, rows: Optional[int]) -> torch.Tensor:
    """The first ``rows`` rows (a view), or ``w`` zero-padded to ``rows`` (a new tensor)."""
    if rows is None or rows <= w.shape[0]:
        return w[:rows]
    out = w.new_zeros(rows, *w.shape[1:])
    out[: w.shape[0]] = w
    return out


def megatron_to_hf(
    state_dict: dict,
    model_cfg,
    hf_vocab_size: Optional[int] = None,
    *,
    consume: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> dict:
    """D's full (TP=1) state dict -> the HF state dict of ``model_cfg``'s kind (new tensors).

    ``consume``: entries are removed from ``state_dict`` as they are mapped, so that converting
    costs about one copy of the weights, not two. ``dtype``: cast on the way (e.g. bf16)."""
    m = model_cfg
    heads = m.num_heads
    sd = state_dict if consume else dict(state_dict)
    for key in [k for k in sd if k.endswith("_extra_state")]:
        del sd[key]

    def take(key: str) -> torch.Tensor:
        return sd.pop(key)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)

    out: dict = {}
    shared = fresh(_resize_rows(take("embedding.weight"), hf_vocab_size))
    for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        out[key] = shared
    out["lm_head.weight"] = shared if m.tie_word_embeddings else fresh(_resize_rows(take("lm_head.weight"), hf_vocab_size))
    for stack, n in (("encoder", m.num_encoder_layers), ("decoder", m.num_decoder_layers)):
        out[f"{stack}.final_layer_norm.weight"] = fresh(take(f"{stack}.final_layernorm.weight"))
        if not m.relative_attention_per_layer:
            out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = fresh(
                take(f"{stack}.relative_attention_bias.weight")
            )
        for i in range(n):
            p = f"{stack}.layers.{i}."
            h = f"{stack}.block.{i}.layer."
            q, k, v = _split_grouped(take(p + "self_attention.linear_qkv.weight"), heads, 3)
            out[h + "0.SelfAttention.q.weight"] = fresh(q)
            out[h + "0.SelfAttention.k.weight"] = fresh(k)
            out[h + "0.SelfAttention.v.weight"] = fresh(v)
            out[h + "0.SelfAttention.o.weight"] = fresh(take(p + "self_attention.linear_proj.weight"))
            if m.relative_attention_per_layer:
                out[h + "0.SelfAttention.relative_attention_bias.weight"] = fresh(take(p + LAYER_BIAS))
            out[h + "0.layer_norm.weight"] = fresh(take(p + "input_layernorm.weight"))
            ff = 1
            if stack == "decoder":
                ff = 2
                out[h + "1.EncDecAttention.q.weight"] = fresh(take(p + "cross_attention.linear_q.weight"))
                ck, cv = _split_grouped(take(p + "cross_attention.linear_kv.weight"), heads, 2)
                out[h + "1.EncDecAttention.k.weight"] = fresh(ck)
                out[h + "1.EncDecAttention.v.weight"] = fresh(cv)
                out[h + "1.EncDecAttention.o.weight"] = fresh(take(p + "cross_attention.linear_proj.weight"))
                out[h + "1.layer_norm.weight"] = fresh(take(p + "pre_cross_attn_layernorm.weight"))
            fc1 = take(p + "mlp.linear_fc1.weight")
            for name, part in zip(_fc1_parts(m), fc1.chunk(len(_fc1_parts(m)), dim=0)):
                out[h + f"{ff}.DenseReluDense.{name}.weight"] = fresh(part)
            del fc1
            out[h + f"{ff}.DenseReluDense.wo.weight"] = fresh(take(p + "mlp.linear_fc2.weight"))
            out[h + f"{ff}.layer_norm.weight"] = fresh(take(p + "pre_mlp_layernorm.weight"))
    if sd:
        raise KeyError(f"tensors the T5 mapping does not know: {sorted(sd)[:5]}")
    return out


def hf_to_megatron(hf_state_dict: dict, model_cfg, vocab_size: Optional[int] = None) -> dict:
    """The HF state dict of a model of ``model_cfg``'s kind -> D's full (TP=1) state dict."""
    m = model_cfg
    sd = hf_state_dict
    out: dict = {}
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    out["embedding.weight"] = _resize_rows(shared, vocab_size).clone()
    if not m.tie_word_embeddings:
        out["lm_head.weight"] = _resize_rows(sd["lm_head.weight"], vocab_size).clone()
    for stack, n in (("encoder", m.num_encoder_layers), ("decoder", m.num_decoder_layers)):
        out[f"{stack}.final_layernorm.weight"] = sd[f"{stack}.final_layer_norm.weight"].clone()
        if not m.relative_attention_per_layer:
            out[f"{stack}.relative_attention_bias.weight"] = sd[
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            ].clone()
        for i in range(n):
            p = f"{stack}.layers.{i}."
            h = f"{stack}.block.{i}.layer."
            out[p + "self_attention.linear_qkv.weight"] = _join_grouped(
                [sd[h + f"0.SelfAttention.{x}.weight"] for x in "qkv"], m.num_heads
            )
            out[p + "self_attention.linear_proj.weight"] = sd[h + "0.SelfAttention.o.weight"].clone()
            if m.relative_attention_per_layer:
                out[p + LAYER_BIAS] = sd[h + "0.SelfAttention.relative_attention_bias.weight"].clone()
            out[p + "input_layernorm.weight"] = sd[h + "0.layer_norm.weight"].clone()
            ff = 1
            if stack == "decoder":
                ff = 2
                out[p + "cross_attention.linear_q.weight"] = sd[h + "1.EncDecAttention.q.weight"].clone()
                out[p + "cross_attention.linear_kv.weight"] = _join_grouped(
                    [sd[h + f"1.EncDecAttention.{x}.weight"] for x in "kv"], m.num_heads
                )
                out[p + "cross_attention.linear_proj.weight"] = sd[h + "1.EncDecAttention.o.weight"].clone()
                out[p + "pre_cross_attn_layernorm.weight"] = sd[h + "1.layer_norm.weight"].clone()
            out[p + "mlp.linear_fc1.weight"] = torch.cat(
                [sd[h + f"{ff}.DenseReluDense.{name}.weight"] for name in _fc1_parts(m)], 0
            )
            out[p + "mlp.linear_fc2.weight"] = sd[h + f"{ff}.DenseReluDense.wo.weight"].clone()
            out[p + "pre_mlp_layernorm.weight"] = sd[h + f"{ff}.layer_norm.weight"].clone()
    return out


def hf_classes(model_type: str):
    """(config class, ``...ForConditionalGeneration`` class) of an HF model type (t5, mt5, umt5)."""
    # transformers takes seconds to import; training (which uses this module's name mapping for
    # initialisation) never needs it, only the export/import paths that call here.
    import transformers

    names = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}
    if model_type not in names:
        raise ValueError(f"no HF T5 family model type {model_type!r} (known: {', '.join(names)})")
    prefix = names[model_type]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForConditionalGeneration")


def hf_config(model_cfg, vocab_size: int, **overrides):
    """The HF config of ``model_cfg``'s kind (``model.hf_model_type``; ids pad 0 / EOS 1)."""
    config_class, _ = hf_classes(model_cfg.hf_model_type)
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=model_cfg.d_model,
        d_kv=model_cfg.d_kv,
        d_ff=model_cfg.d_ff,
        num_layers=model_cfg.num_encoder_layers,
        num_decoder_layers=model_cfg.num_decoder_layers,
        num_heads=model_cfg.num_heads,
        relative_attention_num_buckets=model_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=model_cfg.relative_attention_max_distance,
        dropout_rate=model_cfg.dropout,
        layer_norm_epsilon=model_cfg.layer_norm_epsilon,
        feed_forward_proj=model_cfg.feed_forward,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        is_encoder_decoder=True,
        decoder_start_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def hf_head_is_tied(hf_model) -> bool:
    """Whether an HF T5-family model's LM head is its shared embedding."""
    lm, shared = hf_model.lm_head.weight, hf_model.shared.weight
    return lm is shared or lm.data_ptr() == shared.data_ptr()


def untie_lm_head(hf_model):
    """Gives an HF T5-family model built from a config its own ``lm_head`` weight (untied models).

    transformers 5.x ``T5Config``/``MT5Config``/``UMT5Config`` force ``tie_word_embeddings=True``
    (T5 and UMT5 keep the v1.1 flag only as ``scale_decoder_outputs=False``), so the model class
    ties ``lm_head.weight`` to ``shared.weight`` at construction. ``from_pretrained`` unties them by
    itself when a checkpoint holds two different tensors; a model built in memory needs this.
    """
    if hf_head_is_tied(hf_model):
        hf_model.lm_head.weight = torch.nn.Parameter(hf_model.shared.weight.detach().clone())
    tied = getattr(hf_model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)
    if getattr(hf_model.config, "scale_decoder_outputs", False):
        raise RuntimeError("HF T5 config rescales decoder outputs (T5 v1.0 behaviour); pass tie_word_embeddings=False")
    return hf_model


def build_hf_model(model_cfg, vocab_size: int):
    """An HF model of ``model_cfg``'s kind from its config (random weights; untied when ``model_cfg`` is)."""
    _, model_class = hf_classes(model_cfg.hf_model_type)
    model = model_class(hf_config(model_cfg, vocab_size))
    return model if model_cfg.tie_word_embeddings else untie_lm_head(model)


def megatron_d_to_hf_model(d_module, hf_vocab_size: Optional[int] = None):
    """Convenience for TP=1: an HF model of D's kind with D's weights (fp32)."""
    cfg = d_module.model_cfg
    vocab = hf_vocab_size or d_module.vocab_size
    hf = build_hf_model(cfg, vocab)
    sd = megatron_to_hf(
        {k: v.detach().float().cpu() for k, v in d_module.state_dict().items() if torch.is_tensor(v)},
        cfg,
        hf_vocab_size=vocab,
    )
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("embed_tokens.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF T5 weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _fc1_parts(model_cfg) -> tuple[str, ...]:
    """The HF tensors ``linear_fc1`` stacks: ``wi`` (ReLU, T5 v1.0) or ``[wi_0; wi_1]`` (gated)."""
    return ("wi",) if model_cfg.feed_forward == "relu" else ("wi_0", "wi_1")


LAYER_BIAS = "self_attention.core_attention.relative_attention_bias.weight"  # UMT5's per-layer table
