"""Weight initialisation (``model.init``): per-tensor statistics of both schemes, the attention-logit
scale they give, the tied MLM head's scale, seed keys, Megatron's TP marks, refusal of unknown
parameters. (Layout independence: tests/parallel/test_pipeline.py builds every TP/PP layout on
Megatron's GPU init path and compares with TP = 1 x PP = 1.)"""

import math

import pytest
import torch

from spactor_mega.parallel.state import single_process_parallel

SHAPES = dict(d_model=256, d_kv=32, num_heads=8, d_ff=512, num_encoder_layers=2, num_decoder_layers=2)
G_D_FF, G_HEADS = 384, 4  # G's own sizes, so its rules are seen to use them
VOCAB = 512


@pytest.fixture(scope="module")
def parallel():
    with single_process_parallel(seed=1234):
        yield


def _build(scheme, seed=1234, **shapes):
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import tiny_config

    cfg = tiny_config(depth_fraction=0.5, init=scheme, **(shapes or SHAPES))
    cfg.generator.d_ff, cfg.generator.num_heads = G_D_FF, G_HEADS
    cfg.train.seed = seed
    return cfg, build_spactor_modules(cfg, VOCAB)


def _expected_std(scheme, tensor, *, d, d_kv, heads, d_ff, layers):
    """The scheme's std for an HF-named tensor (the brief's table, written out independently)."""
    if scheme == "t5":
        return {"q": (d * d_kv) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": (heads * d_kv) ** -0.5,
                "wi_0": d**-0.5, "wi_1": d**-0.5, "wo": d_ff**-0.5, "relative_attention_bias": d**-0.5,
                "shared": 1.0, "lm_head": d**-0.5, "dense": d**-0.5, "out": d**-0.5}[tensor]
    return 0.02 / math.sqrt(2 * layers) if tensor in ("o", "wo") else 0.02


def _check(name, t, std):
    """std within 4 standard errors (std of a sample std ~ std / sqrt(2n)), mean ~ 0."""
    n = t.numel()
    t = t.double()
    assert abs(t.std().item() / std - 1) < 4 / math.sqrt(2 * n), f"{name}: std {t.std().item():.5f}, want {std:.5f}"
    assert abs(t.mean().item()) < 4 * std / math.sqrt(n), f"{name}: mean {t.mean().item():.5f} (std {std:.5f})"


def _generator_tensors(g, heads):
    """G's weights by HF T5 tensor name (``layers.<i>.<q|k|v|o|wi_0|wi_1|wo>``) and its bias table."""
    from spactor_mega.model.hf_mapping import _split_grouped

    out = {}
    for name, t in g.state_dict().items():
        if not torch.is_tensor(t) or "layernorm" in name:
            continue
        if name == "encoder.relative_attention_bias.weight":
            out["relative_attention_bias"] = t
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "self_attention.linear_qkv.weight":
            pieces = dict(zip("qkv", _split_grouped(t, heads, 3)))
        elif rest == "self_attention.linear_proj.weight":
            pieces = {"o": t}
        elif rest == "mlp.linear_fc1.weight":
            pieces = dict(zip(("wi_0", "wi_1"), t.chunk(2)))
        else:
            assert rest == "mlp.linear_fc2.weight", name
            pieces = {"wo": t}
        out.update({f"layers.{i}.{k}": v for k, v in pieces.items()})
    return out


@pytest.mark.parametrize("scheme", ["t5", "megatron"])
def test_per_tensor_statistics_follow_the_scheme(parallel, scheme):
    from spactor_mega.model.hf_mapping import megatron_to_hf

    cfg, (d, g, rtd) = _build(scheme)
    m = cfg.model
    dims = dict(d=m.d_model, d_kv=m.d_kv, heads=m.num_heads, d_ff=m.d_ff)
    hf = megatron_to_hf({k: v for k, v in d.state_dict().items() if torch.is_tensor(v)},
                        m)
    seen = set()
    for name, t in hf.items():
        tensor = name.split(".")[-2]
        if tensor in ("layer_norm", "final_layer_norm"):
            assert torch.equal(t, torch.ones_like(t)), name
            continue
        if tensor == "embed_tokens":  # HF's tie to shared.weight
            continue
        _check(name, t, _expected_std(scheme, tensor, layers=m.num_encoder_layers, **dims))
        seen.add(tensor)
    assert seen == {"shared", "lm_head", "q", "k", "v", "o", "wi_0", "wi_1", "wo", "relative_attention_bias"}

    g_layers = g.config.num_layers
    for name, t in _generator_tensors(g, G_HEADS).items():
        std = _expected_std(scheme, name.split(".")[-1], d=m.d_model, d_kv=m.d_kv, heads=G_HEADS, d_ff=G_D_FF,
                            layers=g_layers)
        _check(f"generator {name}", t, std)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in g.named_parameters() if "layernorm" in n)

    for name in ("dense", "out"):
        _check(f"rtd_head {name}", getattr(rtd, name).weight, _expected_std(scheme, name, layers=1, **dims))
        assert torch.equal(getattr(rtd, name).bias, torch.zeros_like(getattr(rtd, name).bias))


def test_weights_are_keyed_by_seed_part_layer_and_name(parallel):
    _, (d1, g1, rtd1) = _build("t5", seed=7)
    _, (d2, g2, rtd2) = _build("t5", seed=7)
    _, (d3, _, _) = _build("t5", seed=8)
    for a, b in ((d1, d2), (g1, g2), (rtd1, rtd2)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    assert not torch.equal(d1.embedding.weight, d3.embedding.weight)
    layer = lambda m, stack, i: getattr(m, stack).layers[i].self_attention.linear_qkv.weight  # noqa: E731
    assert not torch.equal(layer(d1, "encoder", 0), layer(d1, "encoder", 1))
    assert not torch.equal(layer(d1, "encoder", 0), layer(d1, "decoder", 0))
    assert not torch.equal(layer(d1, "encoder", 0)[:64], layer(g1, "encoder", 0)[:64])


@pytest.mark.parametrize("scheme,low,high", [("t5", 0.8, 1.25), ("megatron", 2.0, math.inf)])
def test_attention_logit_std_at_width_1024(parallel, scheme, low, high):
    """T5's scales give logits of std ~1 on unit-RMS inputs; N(0, 0.02) gives 0.02^2 d sqrt(d_kv) = 3.3."""
    from spactor_mega.model.init import attention_logit_std
    from spactor_mega.model.synthetic import tiny_config
    from spactor_mega.model.t5 import T5Discriminator

    m = tiny_config(init=scheme, d_model=1024, d_kv=64, num_heads=16, d_ff=256, num_encoder_layers=1,
                    num_decoder_layers=1).model
    d = T5Discriminator(m, 1024, post_process=False, decoder_layers=(0, 0))
    tokens = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
    std = attention_logit_std(d, tokens)
    assert low <= std <= high, f"{scheme}: attention logit std {std:.3f}, want in [{low}, {high}]"


@pytest.mark.parametrize("scheme", ["t5", "megatron"])
def test_initial_logits(parallel, scheme):
    """Under t5 D's untied head (std d_model^-1/2) and G's tied head (embedding std 1, input scaled
    by d_model^-1/2) both start with logits of std ~1; under megatron G's head is not rescaled."""
    from spactor_mega.model.synthetic import synthetic_batch

    cfg, (d, g, _) = _build(scheme)
    b = synthetic_batch(4, 64, 16, mlm_slots=8, sp_size=400, seed=3)
    with torch.no_grad():
        g_logits = g(b["enc_tokens"], b["enc_mask"], b["mlm_positions"])
        d_logits = d(b["enc_tokens"], b["dec_input"], b["enc_mask"]).lm_logits
    if scheme == "t5":
        assert g.mlm_head.scale == cfg.model.d_model**-0.5
        for what, logits in (("G", g_logits), ("D", d_logits)):
            assert 0.7 < logits.std().item() < 1.4, (what, logits.std().item())
    else:
        assert g.mlm_head.scale == 1.0
        want = 0.02 * math.sqrt(cfg.model.d_model)  # unit-RMS hidden state times N(0, 0.02) rows
        assert abs(g_logits.std().item() / want - 1) < 0.2, g_logits.std().item()


def test_tensor_parallel_marks_are_megatrons(parallel):
    """Built with perform_initialization=False, our layers carry the TP marks Megatron gives them
    when it initialises (gated fc1: stride 2)."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.spec_utils import build_module

    from spactor_mega.model.spec import t5_decoder_layer_spec, t5_transformer_config

    _, (d, _, _) = _build("megatron")
    m = d.model_cfg
    config = t5_transformer_config(m, num_layers=m.num_decoder_layers, perform_initialization=True)
    reference = {f"decoder.layers.0.{n}": p
                 for n, p in build_module(t5_decoder_layer_spec(), config=config, layer_number=1).named_parameters()}
    reference["embedding.weight"] = tensor_parallel.VocabParallelEmbedding(
        VOCAB, m.d_model, init_method=config.init_method, config=config).weight
    reference["lm_head.weight"] = tensor_parallel.ColumnParallelLinear(
        m.d_model, VOCAB, config=config, init_method=config.init_method, bias=False).weight
    ours = dict(d.named_parameters())

    def marks(p):
        return tuple(getattr(p, a, None) for a in ("tensor_model_parallel", "partition_dim", "partition_stride"))

    for name, p in reference.items():
        assert marks(ours[name]) == marks(p), (name, marks(ours[name]), marks(p))
    assert marks(ours["decoder.layers.0.mlp.linear_fc1.weight"]) == (True, 0, 2)


def test_a_parameter_without_a_rule_is_refused(parallel):
    from spactor_mega.model.init import initialize_discriminator

    _, (d, _, _) = _build("t5")
    d.encoder.layers[0].mlp.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(KeyError, match="encoder.layers.0.mlp.extra"):
        initialize_discriminator(d, "t5", 0)
