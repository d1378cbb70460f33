"""Pipeline layouts: parsing, rejections, FLOPs balancing (pure Python, no process groups)."""

import itertools

import pytest

from spactor_mega.config import Config, ConfigError
from spactor_mega.plan.layout import (
    LayerCosts,
    PipelineLayout,
    StageLayout,
    balance,
    balanced_layout,
    bubble_fraction,
    layer_costs,
    parse_layout,
    resolve_layout,
    stage_costs,
)


def _cfg(n_enc=8, n_dec=8, pp=1, layout=None, engine="megatron", vp=1):
    cfg = Config()
    cfg.model.num_encoder_layers, cfg.model.num_decoder_layers = n_enc, n_dec
    cfg.parallel.pipeline_model_parallel_size, cfg.parallel.pipeline_layout = pp, layout
    cfg.parallel.virtual_pipeline_model_parallel_size = vp
    cfg.train.engine = engine
    return cfg


def _check_cover(layout: PipelineLayout, n_enc: int, n_dec: int) -> None:
    enc = [k for s in layout.stages for k in s.encoder_layers]
    dec = [k for s in layout.stages for k in s.decoder_layers]
    assert enc == list(range(n_enc)) and dec == list(range(n_dec))  # every layer once, in order
    assert all(s.num_layers > 0 for s in layout.stages)
    # encoder layers all come before decoder layers in stage order
    last_e = layout.stage_holding_last_encoder_layer
    first_d = layout.first_decoder_stage
    if last_e is not None and first_d is not None:
        assert last_e <= first_d
    assert parse_layout(layout.describe(), n_enc, n_dec) == layout


# ---------------------------------------------------------------- parsing


def test_parse_separate_stacks():
    layout = parse_layout("E6|E6|D4|D4|D4", 12, 12)
    assert layout.num_stages == 5
    assert layout.stages[0] == StageLayout(range(0, 6), range(0, 0))
    assert layout.stages[1] == StageLayout(range(6, 12), range(0, 0))
    assert [s.decoder_layers for s in layout.stages[2:]] == [range(0, 4), range(4, 8), range(8, 12)]
    assert layout.stage_holding_last_encoder_layer == 1
    assert layout.first_decoder_stage == 2
    assert layout.describe() == "E6|E6|D4|D4|D4"
    _check_cover(layout, 12, 12)


def test_parse_stage_holding_both_stacks():
    layout = parse_layout("E4|E2D2|D4", 6, 6)
    assert layout.stages[1] == StageLayout(range(4, 6), range(0, 2))
    assert layout.stages[2] == StageLayout(range(6, 6), range(2, 6))
    assert layout.stage_holding_last_encoder_layer == 1
    assert layout.first_decoder_stage == 1
    assert layout.describe() == "E4|E2D2|D4"
    _check_cover(layout, 6, 6)


def test_parse_single_stage_and_whitespace():
    assert parse_layout("E8D8", 8, 8).describe() == "E8D8"
    assert parse_layout(" E2 | E2D1 |D3 ", 4, 4).describe() == "E2|E2D1|D3"


@pytest.mark.parametrize(
    "text, match",
    [
        ("E6|E4|D12", r"parallel\.pipeline_layout='E6\|E4\|D12': holds 10 encoder layers but model\.num_encoder_layers=12"),
        ("E12|D4|D4", r"holds 8 decoder layers but model\.num_decoder_layers=12"),
        ("E6|D6|E6|D6", r"stage 2 'E6' holds encoder layers after decoder layers"),
        ("E6|D2E6|D10", r"stage 1 'D2E6' is not E<n>, D<n> or E<n>D<n> \(encoder layers come before decoder"),
        ("E12||D12", r"stage 1 is empty"),
        ("E12|D12|", r"stage 2 is empty"),
        ("", r"parallel\.pipeline_layout='': is empty"),
        ("E12|D0|D12", r"stage 1 'D0' has a zero layer count"),
        ("E12|X3|D12", r"stage 1 'X3' is not E<n>, D<n> or E<n>D<n>"),
        ("E12,D12", r"stage 0 'E12,D12' is not"),
    ],
)
def test_parse_rejections(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_layout(text, 12, 12)
    message = str(info.value)
    assert "\n" not in message and message.startswith("parallel.pipeline_layout=")


# ---------------------------------------------------------------- balancing

_COSTS = [
    LayerCosts(encoder_layer=1, decoder_layer=1, first_stage_extra=0, last_stage_extra=0),
    LayerCosts(encoder_layer=2, decoder_layer=3, first_stage_extra=1, last_stage_extra=4),
    LayerCosts(encoder_layer=5, decoder_layer=2, first_stage_extra=0, last_stage_extra=7),
    LayerCosts(encoder_layer=3, decoder_layer=7, first_stage_extra=5, last_stage_extra=0),
]


def _brute_force_optimum(n_enc, n_dec, p, costs):
    n = n_enc + n_dec
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0,) + cuts + (n,)
        counts = [(max(0, min(j, n_enc) - i), (j - i) - max(0, min(j, n_enc) - i)) for i, j in zip(bounds, bounds[1:])]
        layout = parse_layout("|".join((f"E{e}" if e else "") + (f"D{d}" if d else "") for e, d in counts), n_enc, n_dec)
        best = min(best, max(stage_costs(layout, costs)))
    return best


@pytest.mark.parametrize("costs", _COSTS)
def test_balance_matches_brute_force(costs):
    for n_enc in range(1, 6):
        for n_dec in range(1, 6):
            for p in range(1, n_enc + n_dec + 1):
                layout = balance(n_enc, n_dec, p, costs)
                assert layout.num_stages == p
                _check_cover(layout, n_enc, n_dec)
                assert max(stage_costs(layout, costs)) == _brute_force_optimum(n_enc, n_dec, p, costs), (
                    n_enc, n_dec, p, layout.describe())


def test_balanced_layout_covers_every_layer_for_many_shapes():
    for n_enc in (1, 2, 3, 6, 8, 12, 24):
        for n_dec in (1, 2, 5, 8, 12, 24):
            cfg = _cfg(n_enc, n_dec)
            for p in sorted({1, 2, 3, 4, 5, 8, n_enc + n_dec} - {q for q in range(99) if q > n_enc + n_dec}):
                for lengths in ((512, 114), (128, 128)):
                    layout = balanced_layout(cfg, p, *lengths)
                    assert layout.num_stages == p
                    _check_cover(layout, n_enc, n_dec)


def test_layer_costs_come_from_the_flops_model():
    from spactor_mega.plan.flops import sample_flops

    cfg = _cfg(8, 8)
    c = layer_costs(cfg, 512, 114, vocab_size=32128)
    total = sample_flops(cfg, 512, 114, 32128, 0).discriminator
    assert 8 * c.encoder_layer + 8 * c.decoder_layer + c.last_stage_extra == total
    assert c.first_stage_extra == 0  # the embedding lookup has no matmul FLOPs
    # equal lengths: a decoder layer (self + cross attention + FFN) costs more than an encoder layer
    same = layer_costs(cfg, 256, 256)
    assert same.decoder_layer > same.encoder_layer
    extra = layer_costs(cfg, 256, 256, first_stage_extra_flops=5.0, last_stage_extra_flops=7.0)
    assert extra.first_stage_extra == 5.0 and extra.last_stage_extra == same.last_stage_extra + 7.0


def test_lm_head_and_first_stage_extra_are_paid():
    costs = LayerCosts(encoder_layer=1, decoder_layer=1, first_stage_extra=0, last_stage_extra=0)
    assert balance(4, 4, 2, costs).describe() == "E4|D4"
    heavy_head = LayerCosts(encoder_layer=1, decoder_layer=1, first_stage_extra=0, last_stage_extra=2)
    assert balance(4, 4, 2, heavy_head).describe() == "E4D1|D3"
    heavy_first = LayerCosts(encoder_layer=1, decoder_layer=1, first_stage_extra=2, last_stage_extra=0)
    assert balance(4, 4, 2, heavy_first).describe() == "E3|E1D4"


@pytest.mark.parametrize("n, p", [(4, 2), (6, 2), (8, 4), (12, 4), (12, 6)])
def test_costlier_decoder_layers_get_fewer_layers_per_stage(n, p):
    cfg = _cfg(n, n)
    layout = balanced_layout(cfg, p, 256, 256, vocab_size=128)  # equal lengths: decoder layers cost more
    assert layer_costs(cfg, 256, 256).decoder_layer > layer_costs(cfg, 256, 256).encoder_layer
    # the first stage (encoder only) holds more layers than the last (decoder only) ...
    assert layout.stages[0].num_layers > layout.stages[-1].num_layers, layout.describe()
    # ... every encoder-only stage at least as many as any decoder-only stage ...
    enc_only = [s.num_layers for s in layout.stages if not len(s.decoder_layers)]
    dec_only = [s.num_layers for s in layout.stages if not len(s.encoder_layers)]
    if enc_only and dec_only:
        assert min(enc_only) >= max(dec_only), layout.describe()
    # ... and the first half of the stages holds more than half of the layers
    assert sum(s.num_layers for s in layout.stages[: p // 2]) > n, layout.describe()


def test_balance_rejects_more_stages_than_layers():
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=5 must be between 1 and the 4"):
        balance(2, 2, 5, _COSTS[0])


# ---------------------------------------------------------------- resolve_layout


def test_resolve_uses_explicit_layout():
    layout = resolve_layout(_cfg(12, 12, pp=5, layout="E6|E6|D4|D4|D4"), 512, 114)
    assert layout.describe() == "E6|E6|D4|D4|D4"


def test_resolve_balances_without_layout():
    cfg = _cfg(8, 8, pp=4)
    assert resolve_layout(cfg, 512, 114) == balanced_layout(cfg, 4, 512, 114)
    assert resolve_layout(_cfg(8, 8, pp=1), 512, 114).describe() == "E8D8"


def test_resolve_rejects_stage_count_mismatch():
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_layout='E6\|E6\|D6\|D6' has 4 stages but "
                                          r"parallel\.pipeline_model_parallel_size=2"):
        resolve_layout(_cfg(12, 12, pp=2, layout="E6|E6|D6|D6"), 512, 114)


def test_virtual_stages_have_pp_times_v_stages_in_virtual_order():
    assert resolve_layout(_cfg(4, 4, pp=2, vp=2, layout="E2|E2|D2|D2"), 512, 114).num_stages == 4
    assert resolve_layout(_cfg(8, 8, pp=2, vp=2), 512, 114).num_stages == 4  # balanced over PP x V
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_layout='E4\|D4' has 2 stages but "
                                          r"parallel\.pipeline_model_parallel_size=2 x "
                                          r"parallel\.virtual_pipeline_model_parallel_size=2 = 4"):
        resolve_layout(_cfg(4, 4, pp=2, vp=2, layout="E4|D4"), 512, 114)
    with pytest.raises(ConfigError, match=r"size=2 x parallel\.virtual_pipeline_model_parallel_size=3 stages "
                                          r"exceed the 4 transformer layers"):
        resolve_layout(_cfg(2, 2, pp=2, vp=3), 512, 114)


def test_resolve_rejects_layout_not_matching_model():
    with pytest.raises(ConfigError, match=r"holds 12 encoder layers but model\.num_encoder_layers=8"):
        resolve_layout(_cfg(8, 8, pp=3, layout="E6|E6|D8"), 512, 114)


def test_resolve_rejects_more_stages_than_layers():
    with pytest.raises(ConfigError, match=r"pipeline_model_parallel_size=5 exceeds the 4 transformer layers"):
        resolve_layout(_cfg(2, 2, pp=5), 512, 114)


def test_resolve_rejects_deepspeed_with_pipeline():
    with pytest.raises(ConfigError, match=r"train\.engine=deepspeed .*pipeline_model_parallel_size=2.*"
                                          r"DeepSpeed forbids ZeRO-2/3 with pipelines.*PP = 1 only"):
        resolve_layout(_cfg(8, 8, pp=2, engine="deepspeed"), 512, 114)
    # with PP = 1 DeepSpeed is fine
    assert resolve_layout(_cfg(8, 8, pp=1, engine="deepspeed"), 512, 114).num_stages == 1


# ---------------------------------------------------------------- bubble


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(4, 13) == pytest.approx(3 / 16)
    assert bubble_fraction(8, 64) < bubble_fraction(8, 16)
    assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)  # interleaved: v m + p - 1
    with pytest.raises(ValueError):
        bubble_fraction(0, 4)
    with pytest.raises(ValueError):
        bubble_fraction(2, 0)


def test_hybrid_phase_balances_g_on_stage_0_and_replans_at_tau():
    """The hybrid layout counts G's (and the RTD head's) FLOPs on the end stages: stage 0 gets
    fewer layers and the hybrid phase's slowest stage is cheaper than under the SC-only split; a
    run re-plans only with AdamW, without a given layout, when both phases occur (one that is
    hybrid throughout keeps the hybrid balance)."""
    from spactor_mega.curriculum import Phase
    from spactor_mega.data.span_corruption import mlm_capacity, noise_counts, random_spans_helper
    from spactor_mega.plan.flops import sample_flops
    from spactor_mega.plan.layout import config_layout, replans_at_tau

    cfg = _cfg(12, 12, pp=4)
    cfg.spactor.tau, cfg.train.steps = 100, 1000
    hybrid, sc = config_layout(cfg, phase=Phase.HYBRID), config_layout(cfg)
    assert replans_at_tau(cfg) and sc == resolve_layout(cfg, 512, 114)
    assert hybrid.stages[0].num_layers < sc.stages[0].num_layers
    s = cfg.spactor
    raw, dec = random_spans_helper(512, s.noise_density, s.mean_noise_span_length)
    _, spans = noise_counts(raw, s.noise_density, s.mean_noise_span_length)
    flops = sample_flops(cfg, 512, dec, 32128, mlm_capacity(512, spans, s.mlm_fraction))
    costs = layer_costs(cfg, 512, dec, first_stage_extra_flops=flops.generator, last_stage_extra_flops=flops.rtd_head)
    assert hybrid == balance(12, 12, 4, costs)
    assert max(stage_costs(hybrid, costs)) < 0.95 * max(stage_costs(sc, costs))
    adafactor = _cfg(12, 12, pp=4)
    adafactor.spactor.tau, adafactor.train.steps, adafactor.optim.optimizer = 100, 1000, "adafactor"
    assert replans_at_tau(adafactor)  # its state is checkpointed per parameter, so it moves between stages
    for field, value in (("parallel.pipeline_layout", "E6|E6|D6|D6"),
                         ("spactor.tau", 0), ("spactor.tau", float("inf")), ("parallel.pipeline_model_parallel_size", 1)):
        other = _cfg(12, 12, pp=4)
        other.spactor.tau, other.train.steps = 100, 1000
        section, name = field.split(".")
        setattr(getattr(other, section), name, value)
        assert not replans_at_tau(other), field
        same = config_layout(other, phase=Phase.HYBRID) == config_layout(other)
        assert same == (value != float("inf")), field  # hybrid throughout: G's balance throughout
