"""G's size and sharing, Gumbel-max sampling, and the SpacTor step in both stages (TP=1)."""

import pytest
import torch

from spactor_mega.curriculum import Phase

from spactor_mega.parallel.state import single_process_parallel

VOCAB, SP_SIZE, MASK_ID = 256, 150, 250


@pytest.fixture(scope="module")
def parallel():
    with single_process_parallel(seed=1234):
        yield


def _build(tau=10.0, depth_fraction=0.5, **gen):
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import tiny_config

    cfg = tiny_config(tau=tau, depth_fraction=depth_fraction)
    for k, v in gen.items():
        setattr(cfg.generator, k, v)
    return cfg, build_spactor_modules(cfg, VOCAB)


def _objective(**kw):
    from spactor_mega.model.spactor import SpactorObjective

    return SpactorObjective(mask_id=MASK_ID, sample_vocab_size=SP_SIZE, **kw)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 1.0])
def test_generator_size_follows_depth_fraction(parallel, fraction):
    from spactor_mega.plan.derived import generator_num_layers

    cfg, (d, g, rtd) = _build(depth_fraction=fraction, d_ff=48, num_heads=4)
    cfg.model.num_encoder_layers = 4  # the rule itself, on a deeper D
    assert generator_num_layers(cfg) == max(1, round(fraction * 4))
    cfg.model.num_encoder_layers = 2
    n = generator_num_layers(cfg)
    assert len(g.encoder.layers) == n == max(1, round(fraction * 2))
    m = cfg.model
    h, dkv, dff, d_model = 4, m.d_kv, 48, m.d_model
    per_layer = 2 * d_model + 4 * h * dkv * d_model + 3 * dff * d_model  # 2 norms, qkv+o, wi_0/wi_1/wo
    expected = n * per_layer + d_model + m.relative_attention_num_buckets * h  # final norm, bias table
    assert sum(p.numel() for p in g.parameters()) == expected
    # G borrows D's embedding without owning it: not in its parameters or state dict.
    assert all(p is not d.embedding.weight for p in g.parameters())
    assert not any("embedding" in k for k in g.state_dict())
    assert g.shared_embedding is d.embedding


def test_gumbel_sampling_respects_forbidden_ids_and_seed(parallel):
    from spactor_mega.model.generator import gumbel_max_sample

    def seeds(base, rows=40):
        return [base * 1000 + i for i in range(rows)]

    flat = torch.zeros(40, 100, VOCAB)  # 40 samples x 100 MLM slots
    s = gumbel_max_sample(flat, temperature=1.0, row_seeds=seeds(3), sample_vocab_size=SP_SIZE, forbidden_ids=(0, 1))
    assert s.shape == (40, 100)
    assert s.min() >= 2 and s.max() < SP_SIZE
    assert len(torch.unique(s)) > 100  # spread over the allowed ids
    again = gumbel_max_sample(flat, temperature=1.0, row_seeds=seeds(3), sample_vocab_size=SP_SIZE, forbidden_ids=(0, 1))
    other = gumbel_max_sample(flat, temperature=1.0, row_seeds=seeds(4), sample_vocab_size=SP_SIZE, forbidden_ids=(0, 1))
    assert torch.equal(s, again) and not torch.equal(s, other)
    # a row's samples depend on its own seed only, not on the rows batched with it
    alone = gumbel_max_sample(flat[7:9], temperature=1.0, row_seeds=seeds(3)[7:9], sample_vocab_size=SP_SIZE,
                              forbidden_ids=(0, 1))
    assert torch.equal(alone, s[7:9])
    peaked = torch.zeros(64, VOCAB)
    peaked[:, 77] = 50.0
    peaked[:, 200] = 100.0  # above sample_vocab_size: must lose to 77
    out = gumbel_max_sample(peaked, temperature=1.0, row_seeds=seeds(1, 64), sample_vocab_size=SP_SIZE)
    assert torch.all(out == 77)


def _values(metrics: dict) -> dict:
    """The objective's metrics (detached 0-d tensors, left on the device: the engines read them once
    per step, not per micro-batch) as floats."""
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    return {k: v.item() for k, v in metrics.items()}


def test_sc_stage_skips_generator_and_equals_plain_sc_loss(parallel):
    from spactor_mega.model.losses import masked_mean
    from spactor_mega.model.synthetic import synthetic_batch

    _, (d, g, rtd) = _build()
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (g, rtd, g.encoder)]
    batch = synthetic_batch(3, 24, 8, sp_size=SP_SIZE, seed=4, pad_rows=1)
    loss, metrics = _objective()(batch, d, g, rtd, phase=Phase.SC_ONLY)
    metrics = _values(metrics)
    for h in hooks:
        h.remove()
    assert calls == []
    with torch.no_grad():
        logits = d(batch["enc_tokens"], batch["dec_input"], batch["enc_mask"]).lm_logits  # [s, b, V]
        plain = d(batch["enc_tokens"], batch["dec_input"], batch["enc_mask"], labels=batch["labels"]).lm_loss
        plain = masked_mean(plain, batch["dec_loss_mask"])
    assert torch.allclose(loss.detach(), plain, rtol=1e-6)
    # SC target-token accuracy: D's greedy prediction against the labels, over the target tokens
    correct = (logits.argmax(-1).transpose(0, 1) == batch["labels"]).float()
    accuracy = masked_mean(correct, batch["dec_loss_mask"]).item()
    assert metrics == {"loss": pytest.approx(plain.item()), "sc_loss": pytest.approx(plain.item()),
                       "sc_accuracy": pytest.approx(accuracy)}
    # sc-only needs no MLM fields and no generator at all
    no_mlm = synthetic_batch(3, 24, 8, sp_size=SP_SIZE, seed=4, pad_rows=1, with_mlm=False)
    loss2, _ = _objective()(no_mlm, d, phase=Phase.SC_ONLY)
    assert torch.equal(loss2.detach(), loss.detach())


def test_hybrid_step_losses_masking_and_gradients(parallel):
    from spactor_mega.model.synthetic import synthetic_batch

    _, (d, g, rtd) = _build()
    batch = synthetic_batch(4, 32, 8, mlm_slots=8, sp_size=SP_SIZE, seed=6, pad_rows=1)
    lookups = []  # D's embedding is called by G (masked input), D.encode, D.decode, in that order

    def record(module, args, out):
        lookups.append(args[0].clone())

    handle = d.embedding.register_forward_hook(record)
    obj = _objective(mlm_weight=0.7, rtd_weight=3.0, temperature=1.5)
    loss, m = obj(batch, d, g, rtd, phase=Phase.HYBRID)
    m = _values(m)
    loss.backward()
    handle.remove()
    assert len(lookups) == 3
    seen = {"g_in": lookups[0], "d_enc_in": lookups[1]}

    assert m["loss"] == pytest.approx(0.7 * m["mlm_loss"] + 3.0 * m["rtd_loss"] + m["sc_loss"], rel=1e-6)
    for k in ("rtd_accuracy", "rtd_precision", "rtd_recall", "replaced_fraction", "mlm_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    enc, pos, w = batch["enc_tokens"], batch["mlm_positions"], batch["mlm_weights"]
    masked = torch.zeros_like(enc, dtype=torch.bool)
    for b in range(enc.size(0)):
        masked[b, pos[b][w[b] > 0]] = True
    # G saw the mask token exactly at the real MLM positions
    assert torch.equal(seen["g_in"] == MASK_ID, masked)
    assert torch.equal(seen["g_in"][~masked], enc[~masked])
    # D saw the samples there and the original tokens elsewhere
    d_in = seen["d_enc_in"]
    assert torch.equal(d_in[~masked], enc[~masked])
    samples = obj.last_samples
    for b in range(enc.size(0)):
        real = w[b] > 0
        assert torch.equal(d_in[b, pos[b][real]], samples[b][real])
    assert samples.min() >= 2 and samples.max() < SP_SIZE
    replaced = (d_in != enc) & masked
    assert m["replaced_fraction"] == pytest.approx(replaced.sum().item() / batch["enc_mask"].sum().item(), rel=1e-6)
    # gradients reach G, the RTD head, D and the shared embedding (from G's MLM loss too)
    for mod in (g, rtd, d):
        assert all(p.grad is not None for p in mod.parameters())
    assert d.embedding.weight.grad.abs().sum() > 0


def test_generator_mlm_gradient_reaches_shared_embedding(parallel):
    """Only G's loss: the embedding still gets a gradient (via the tied head and the lookup)."""
    from spactor_mega.model.losses import masked_mean, vocab_parallel_ce
    from spactor_mega.model.synthetic import synthetic_batch

    _, (d, g, rtd) = _build()
    b = synthetic_batch(2, 24, 8, sp_size=SP_SIZE, seed=8)
    logits = g(b["enc_tokens"], b["enc_mask"], b["mlm_positions"])
    assert logits.shape == (2, b["mlm_positions"].size(1), VOCAB)
    masked_mean(vocab_parallel_ce(logits, b["mlm_targets"]), b["mlm_weights"]).backward()
    assert d.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in d.named_parameters() if n != "embedding.weight")


@pytest.mark.parametrize("granularity", ["full", "selective", "full-uniform-2", "full-block-1"])
def test_activation_recompute_gives_identical_gradients(parallel, granularity):
    """Megatron's recompute must carry the position-bias gradient (it rides in attention_mask);
    ``full-<method>-<layers>``: full recompute with that method and layer count (4 encoder layers
    there: G gets 2, which groups of 2 divide; the plan refuses groups that do not)."""
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    batch = synthetic_batch(3, 24, 8, sp_size=SP_SIZE, seed=9, pad_rows=1)
    kind, _, method = granularity.partition("-")
    shape = dict(num_encoder_layers=4) if method else {}
    out = {}
    for rg in (None, granularity):
        torch.manual_seed(5)
        overrides = dict(shape, recompute=kind if rg else "none")
        if rg and method:
            overrides.update(recompute_method=method.split("-")[0], recompute_num_layers=int(method.split("-")[1]))
        d, g, rtd = build_spactor_modules(tiny_config(**overrides), VOCAB)
        loss, _ = _objective()(batch, d, g, rtd, phase=Phase.HYBRID)
        loss.backward()
        out[rg] = (loss.detach(), gather_full_state_dict(d, grads=True), gather_full_state_dict(g, grads=True, group=g.tp_group))
    ref, new = out[None], out[granularity]
    assert torch.equal(ref[0], new[0])
    for i in (1, 2):
        for k in ref[i]:
            assert torch.allclose(ref[i][k], new[i][k], rtol=1e-6, atol=1e-8), k
    assert new[1]["encoder.relative_attention_bias.weight"].abs().sum() > 0
