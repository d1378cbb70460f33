"""Weight mapping between D's TP=1 state dict and HF ``T5ForConditionalGeneration`` (v1.1 layout).

Megatron layouts handled here (TP=1, i.e. full tensors; for TP>1 gather first, e.g. with
``dist_checkpointing`` or :func:`spactor_mega.parallel.tensor_shards.gather_full_state_dict`):

- self-attention ``linear_qkv.weight`` ``[heads * 3 * d_kv, d_model]``: grouped per head (one
  query group per head), each group ``[q_h; k_h; v_h]`` -> HF ``q``, ``k``, ``v`` ``[heads*d_kv, d_model]``;
- cross-attention ``linear_q.weight`` is HF ``q`` as is; ``linear_kv.weight``
  ``[heads * 2 * d_kv, d_model]`` grouped per head ``[k_h; v_h]`` -> HF ``k``, ``v``;
- ``mlp.linear_fc1.weight`` ``[2 * d_ff, d_model]`` = ``[wi_0; wi_1]``; ``linear_fc2`` = ``wo``;
- one ``relative_attention_bias.weight`` ``[buckets, heads]`` per stack -> HF's block 0 of that stack;
- ``embedding.weight`` -> ``shared.weight`` (HF ties ``encoder/decoder.embed_tokens`` to it);
  ``lm_head.weight`` untied.

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
    num_heads: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    hf_vocab_size: Optional[int] = None,
    *,
    consume: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> dict:
    """D's full (TP=1) state dict -> HF ``T5ForConditionalGeneration`` state dict (new tensors).

    ``consume``: entries are removed from ``state_dict`` as they are mapped, so that converting
    costs about one copy of the weights, not two. ``dtype``: cast on the way (e.g. bf16)."""
    sd = state_dict if consume else dict(state_dict)
    for key in [k for k in sd if k.endswith("_extra_state")]:
        del sd[key]

    def take(key: str) -> torch.Tensor:
        return sd.pop(key)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)

    out: dict = {}
    shared = fresh(_resize_rows(take("embedding.weight"), hf_vocab_size))
    out["shared.weight"] = shared
    out["encoder.embed_tokens.weight"] = shared
    out["decoder.embed_tokens.weight"] = shared
    out["lm_head.weight"] = fresh(_resize_rows(take("lm_head.weight"), hf_vocab_size))
    for stack, n in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
        out[f"{stack}.final_layer_norm.weight"] = fresh(take(f"{stack}.final_layernorm.weight"))
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = fresh(
            take(f"{stack}.relative_attention_bias.weight")
        )
        for i in range(n):
            m = f"{stack}.layers.{i}."
            h = f"{stack}.block.{i}.layer."
            q, k, v = _split_grouped(take(m + "self_attention.linear_qkv.weight"), num_heads, 3)
            out[h + "0.SelfAttention.q.weight"] = fresh(q)
            out[h + "0.SelfAttention.k.weight"] = fresh(k)
            out[h + "0.SelfAttention.v.weight"] = fresh(v)
            out[h + "0.SelfAttention.o.weight"] = fresh(take(m + "self_attention.linear_proj.weight"))
            out[h + "0.layer_norm.weight"] = fresh(take(m + "input_layernorm.weight"))
            ff = 1
            if stack == "decoder":
                ff = 2
                out[h + "1.EncDecAttention.q.weight"] = fresh(take(m + "cross_attention.linear_q.weight"))
                ck, cv = _split_grouped(take(m + "cross_attention.linear_kv.weight"), num_heads, 2)
                out[h + "1.EncDecAttention.k.weight"] = fresh(ck)
                out[h + "1.EncDecAttention.v.weight"] = fresh(cv)
                out[h + "1.EncDecAttention.o.weight"] = fresh(take(m + "cross_attention.linear_proj.weight"))
                out[h + "1.layer_norm.weight"] = fresh(take(m + "pre_cross_attn_layernorm.weight"))
            wi_0, wi_1 = take(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out[h + f"{ff}.DenseReluDense.wi_0.weight"] = fresh(wi_0)
            out[h + f"{ff}.DenseReluDense.wi_1.weight"] = fresh(wi_1)
            del wi_0, wi_1
            out[h + f"{ff}.DenseReluDense.wo.weight"] = fresh(take(m + "mlp.linear_fc2.weight"))
            out[h + f"{ff}.layer_norm.weight"] = fresh(take(m + "pre_mlp_layernorm.weight"))
    if sd:
        raise KeyError(f"tensors the T5 mapping does not know: {sorted(sd)[:5]}")
    return out


def hf_to_megatron(
    hf_state_dict: dict,
    num_heads: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    vocab_size: Optional[int] = None,
) -> dict:
    """HF ``T5ForConditionalGeneration`` state dict -> D's full (TP=1) state dict."""
    sd = hf_state_dict
    out: dict = {}
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    out["embedding.weight"] = _resize_rows(shared, vocab_size).clone()
    out["lm_head.weight"] = _resize_rows(sd["lm_head.weight"], vocab_size).clone()
    for stack, n in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
        out[f"{stack}.final_layernorm.weight"] = sd[f"{stack}.final_layer_norm.weight"].clone()
        out[f"{stack}.relative_attention_bias.weight"] = sd[
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ].clone()
        for i in range(n):
            m = f"{stack}.layers.{i}."
            h = f"{stack}.block.{i}.layer."
            out[m + "self_attention.linear_qkv.weight"] = _join_grouped(
                [sd[h + f"0.SelfAttention.{p}.weight"] for p in "qkv"], num_heads
            )
            out[m + "self_attention.linear_proj.weight"] = sd[h + "0.SelfAttention.o.weight"].clone()
            out[m + "input_layernorm.weight"] = sd[h + "0.layer_norm.weight"].clone()
            ff = 1
            if stack == "decoder":
                ff = 2
                out[m + "cross_attention.linear_q.weight"] = sd[h + "1.EncDecAttention.q.weight"].clone()
                out[m + "cross_attention.linear_kv.weight"] = _join_grouped(
                    [sd[h + f"1.EncDecAttention.{p}.weight"] for p in "kv"], num_heads
                )
                out[m + "cross_attention.linear_proj.weight"] = sd[h + "1.EncDecAttention.o.weight"].clone()
                out[m + "pre_cross_attn_layernorm.weight"] = sd[h + "1.layer_norm.weight"].clone()
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [sd[h + f"{ff}.DenseReluDense.wi_0.weight"], sd[h + f"{ff}.DenseReluDense.wi_1.weight"]], 0
            )
            out[m + "mlp.linear_fc2.weight"] = sd[h + f"{ff}.DenseReluDense.wo.weight"].clone()
            out[m + "pre_mlp_layernorm.weight"] = sd[h + f"{ff}.layer_norm.weight"].clone()
    return out


def hf_t5_config(model_cfg, vocab_size: int, **overrides):
    """A ``transformers.T5Config`` for D (T5 v1.1: gated-GELU, untied head, ids pad 0 / EOS 1)."""
    # transformers takes seconds to import; training (which uses this module's name mapping for
    # initialisation) never needs it, only the export/import paths that call here.
    from transformers import T5Config

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
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        decoder_start_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def untie_lm_head(hf_model):
    """Gives an HF T5 model built from a config its own ``lm_head`` weight.

    transformers 5.x ``T5Config`` forces ``tie_word_embeddings=True`` (it keeps the v1.1 flag only
    as ``scale_decoder_outputs=False``), so ``T5ForConditionalGeneration(config)`` ties
    ``lm_head.weight`` to ``shared.weight`` at construction. ``from_pretrained`` unties them by
    itself when a checkpoint holds two different tensors; a model built in memory needs this.
    """
    lm = hf_model.lm_head
    if lm.weight is hf_model.shared.weight or lm.weight.data_ptr() == hf_model.shared.weight.data_ptr():
        lm.weight = torch.nn.Parameter(hf_model.shared.weight.detach().clone())
    tied = getattr(hf_model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)
    if getattr(hf_model.config, "scale_decoder_outputs", False):
        raise RuntimeError("HF T5 config rescales decoder outputs (T5 v1.0 behaviour); pass tie_word_embeddings=False")
    return hf_model


def megatron_d_to_hf_model(d_module, hf_vocab_size: Optional[int] = None):
    """Convenience for TP=1: an HF ``T5ForConditionalGeneration`` with D's weights (fp32)."""
    from transformers import T5ForConditionalGeneration

    cfg = d_module.model_cfg
    vocab = hf_vocab_size or d_module.vocab_size
    hf = untie_lm_head(T5ForConditionalGeneration(hf_t5_config(cfg, vocab)))
    sd = megatron_to_hf(
        {k: v.detach().float().cpu() for k, v in d_module.state_dict().items() if torch.is_tensor(v)},
        cfg.num_heads,
        cfg.num_encoder_layers,
        cfg.num_decoder_layers,
        hf_vocab_size=vocab,
    )
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("embed_tokens.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF T5 weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()
