"""D computes exactly what HF T5ForConditionalGeneration (T5 v1.1) computes, and the weight
mapping round-trips."""

import pytest
import torch

from spactor_mega.parallel.state import single_process_parallel

VOCAB = 256


@pytest.fixture(scope="module")
def parallel():
    with single_process_parallel(seed=1234):
        yield


@pytest.fixture(scope="module")
def d_and_hf(parallel):
    from spactor_mega.model.hf_mapping import megatron_d_to_hf_model
    from spactor_mega.model.synthetic import tiny_config
    from spactor_mega.model.t5 import T5Discriminator

    torch.manual_seed(0)
    d = T5Discriminator(tiny_config().model, VOCAB).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in d.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return d, megatron_d_to_hf_model(d)


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs scale {scale}"


def test_encoder_states_and_logits_match_hf(d_and_hf):
    from spactor_mega.model.synthetic import synthetic_batch

    d, hf = d_and_hf
    b = synthetic_batch(3, 40, 9, sp_size=150, seed=1, pad_rows=1)  # one row with padding
    with torch.no_grad():
        out = d(b["enc_tokens"], b["dec_input"], b["enc_mask"])
        ref = hf(
            input_ids=b["enc_tokens"],
            attention_mask=b["enc_mask"].long(),
            decoder_input_ids=b["dec_input"],
        )
    _close(out.encoder_hidden.transpose(0, 1), ref.encoder_last_hidden_state)
    _close(out.lm_logits.transpose(0, 1), ref.logits)


def test_sc_loss_matches_hf_loss(d_and_hf):
    from spactor_mega.model.losses import sc_loss
    from spactor_mega.model.synthetic import synthetic_batch

    d, hf = d_and_hf
    b = synthetic_batch(2, 24, 8, sp_size=150, seed=2)
    with torch.no_grad():
        enc = d.encode(b["enc_tokens"], b["enc_mask"])
        ours, _ = sc_loss(d.lm_logits(d.decode(b["dec_input"], enc, b["enc_mask"])), b["labels"], b["dec_loss_mask"])
        labels = b["labels"].masked_fill(b["dec_loss_mask"] == 0, -100)
        ref = hf(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(), labels=labels).loss
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_hf_mapping_round_trip(d_and_hf):
    from spactor_mega.model.hf_mapping import hf_to_megatron, megatron_to_hf

    d, hf = d_and_hf
    cfg = d.model_cfg
    ours = {k: v for k, v in d.state_dict().items() if torch.is_tensor(v)}
    to_hf = megatron_to_hf(ours, cfg)
    hf_sd = hf.state_dict()
    for k, v in to_hf.items():
        assert torch.equal(v, hf_sd[k]), k
    back = hf_to_megatron(to_hf, cfg)
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert torch.equal(back[k], v), k


def test_qkv_layout_is_per_head_q_k_v(d_and_hf):
    """Megatron's fused QKV rows are grouped per head as [q_h; k_h; v_h]."""
    d, hf = d_and_hf
    cfg = d.model_cfg
    qkv = d.encoder.layers[0].self_attention.linear_qkv.weight
    k_hf = hf.encoder.block[0].layer[0].SelfAttention.k.weight
    head1_k = qkv[1 * 3 * cfg.d_kv + cfg.d_kv : 1 * 3 * cfg.d_kv + 2 * cfg.d_kv]
    assert torch.equal(head1_k, k_hf[cfg.d_kv : 2 * cfg.d_kv])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    from spactor_mega.model.attention import relative_position_bucket

    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ours = relative_position_bucket(rel, bidirectional, 32, 128)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, ref)


def test_one_bias_table_per_stack(d_and_hf):
    d, _ = d_and_hf
    names = [n for n, _ in d.named_parameters() if "relative_attention_bias" in n]
    assert names == ["encoder.relative_attention_bias.weight", "decoder.relative_attention_bias.weight"]
    assert not any(n.endswith(".bias") for n, _ in d.named_parameters())  # no linear biases


def test_padded_vocab_size():
    from spactor_mega.model.t5 import padded_vocab_size

    assert padded_vocab_size(32101, 128, 1) == 32128
    assert padded_vocab_size(32101, 128, 2) == 32128  # the same rows for every TP dividing 128
    assert padded_vocab_size(32101, 128, 8) == 32128
    assert padded_vocab_size(256, 128, 2) == 256
    assert padded_vocab_size(1, 8, 3) == 24
    assert padded_vocab_size(25, 8, 3) == 48
    with pytest.raises(ValueError):
        padded_vocab_size(0, 128, 1)


def test_shards_aligned_to_128_at_tp_8_still_export_t5s_rows():
    """make_vocab_size_divisible_by 1024: the same 32,768 rows at every TP up to 8 (checkpoints move
    between them), each shard a multiple of 128, and an HF export of T5's 32,128 rows."""
    from spactor_mega.config import ModelConfig
    from spactor_mega.model.t5 import export_vocab_size, model_vocab_size

    aligned = ModelConfig(make_vocab_size_divisible_by=1024)
    assert {model_vocab_size(aligned, 32101, tp) for tp in (1, 2, 4, 8)} == {32768}
    assert all(32768 // tp % 128 == 0 for tp in (1, 2, 4, 8))
    assert export_vocab_size(aligned, 32101) == 32128
    assert export_vocab_size(ModelConfig(), 32101) == 32128  # the default: T5's rows, as before
    assert export_vocab_size(ModelConfig(make_vocab_size_divisible_by=8), 601) == 608
    assert model_vocab_size(ModelConfig(), 32101, 8) // 8 == 4016  # the default at TP 8
