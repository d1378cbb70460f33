"""The gradient agreement (issue #22, signal 3): the cosine between the gradients of D's SC loss and
of the auxiliary loss on D's embedding and encoder, as the engines measure it, equals a reference
taken with ``torch.autograd.grad`` on one process (TP = 1, PP = 1, the same weights and micro-batch)
to 1e-5 (relative): Megatron's engine at TP = 2 with sequence parallelism, at PP = 2 with the encoder's bias
table on both stages, at TP = 2 x PP = 2 with a tied LM head (its last-stage copy of the embedding)
and with virtual stages; DeepSpeed's (ZeRO-2) at TP = 2 x DP = 2. Every rank gets the same value.
A measurement leaves training bitwise unchanged (dropout on: no RNG stream moves; the distributed
optimizer with overlapped gradient reduction and parameter gather; DeepSpeed ZeRO-2), and the FLOPs
of a measurement follow the FLOPs model. In bf16 (TP = 2 with sequence parallelism, the tied head
at TP = 2 x PP = 2, DeepSpeed) the cosine is within 2% of the fp32 reference."""

import math

import pytest

from spactor_mega.parallel.testing import run_distributed

VOCAB = 256
TOLERANCE = 1e-5
# layout name -> (engine, TP, PP, V, sequence parallel, tied LM head, stage split or None)
LAYOUTS = {
    "megatron-tp2-sp": ("megatron", 2, 1, 1, True, False, None),
    # the encoder's layers on both stages: its bias table is held (and its gradient summed) twice
    "megatron-pp2-bias-on-both": ("megatron", 1, 2, 1, False, False, [((0, 2), (0, 0)), ((2, 4), (0, 2))]),
    "megatron-tp2pp2-tied-sp": ("megatron", 2, 2, 1, True, True, [((0, 3), (0, 0)), ((3, 4), (0, 2))]),
    "megatron-pp2-virtual": ("megatron", 1, 2, 2, False, False,
                             [((0, 1), (0, 0)), ((1, 2), (0, 0)), ((2, 4), (0, 1)), ((0, 0), (1, 2))]),
    "deepspeed-zero2-tp2-dp2": ("deepspeed", 2, 1, 1, False, False, None),
}
# the encoder's bias table and (so that counting the table twice changes the cosine) its final norm
BIAS_TABLE = ("encoder.relative_attention_bias.", "encoder.final_layernorm.")
BF16 = ("megatron-tp2-sp", "megatron-tp2pp2-tied-sp", "deepspeed-zero2-tp2-dp2")  # also measured in bf16
BF16_TOLERANCE = 2e-2  # relative, against the fp32 reference: bf16 weights and activations (8-bit mantissa)
STEPS = 3  # the bitwise check: a measurement after the first of them


def _config(engine: str, tp: int, pp: int, vp: int, sequence_parallel: bool, tied: bool, dropout: float = 0.0):
    from spactor_mega.model.synthetic import tiny_config

    cfg = tiny_config(num_heads=4, num_encoder_layers=4, num_decoder_layers=2, tie_word_embeddings=tied,
                      dropout=dropout)
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.virtual_pipeline_model_parallel_size, p.sequence_parallel = vp, sequence_parallel
    cfg.train.seed = 5
    cfg.train.micro_batch_size = 2
    cfg.train.engine = engine
    if engine == "deepspeed":
        cfg.deepspeed.zero_stage = 2
    return cfg


def _objective(cfg):
    from spactor_mega.model.spactor import SpactorObjective

    return SpactorObjective(mask_id=250, sample_vocab_size=150, temperature=2.0, mlm_weight=1.0, rtd_weight=10.0,
                            seed=cfg.train.seed, z_loss=1e-4)


def _micro_batch(seed: int = 3):
    from spactor_mega.model.synthetic import synthetic_batch

    return synthetic_batch(2, 16, 6, mlm_slots=4, sp_size=150, seed=seed, pad_rows=1)


def _engine(cfg, split, world_size: int, bf16: bool = False):
    import torch

    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.training.engines import build_engine

    p = cfg.parallel
    initialize_parallel(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                        vp=p.virtual_pipeline_model_parallel_size, seed=11)
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * dp * (p.pipeline_model_parallel_size
                                                                     if p.virtual_pipeline_model_parallel_size > 1 else 1)
    if bf16:
        cfg.train.precision = "bf16"
    modules = build_spactor_modules(cfg, VOCAB, stage_split=split, use_cpu_initialization=False,
                                    params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return build_engine(cfg, *modules, _objective(cfg), bf16)


def _reference(cfg, prefixes=("embedding.", "encoder.")) -> float:
    """The definition, by hand on one process: autograd.grad of L_sc (+ z-loss) and of
    w_rtd L_rtd + w_mlm L_mlm with respect to D's embedding and encoder (eval mode), or the
    parameters named by ``prefixes``."""
    import torch

    from spactor_mega.data.host_side import encoder_padding
    from spactor_mega.model.losses import rtd_loss, sc_loss
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import initialize_parallel

    initialize_parallel(tp=1, pp=1, seed=11)
    cfg.parallel.sequence_parallel = False
    d, g, rtd = build_spactor_modules(cfg, VOCAB)
    for module in (d, g, rtd):
        module.eval()
    objective, batch = _objective(cfg), _micro_batch()
    gen = objective.generator_pass(batch, d, g)
    mask, padded = batch["enc_mask"].bool(), encoder_padding(batch)
    encoder_hidden = d.encode(gen["d_input"], mask, padded)
    decoder_hidden = d.decode(batch["dec_input"], encoder_hidden, mask, padded)
    l_sc, l_z = sc_loss(d.lm_logits(decoder_hidden), batch["labels"], batch["dec_loss_mask"], objective.z_loss)
    l_rtd = rtd_loss(rtd(encoder_hidden).transpose(0, 1), gen["is_replaced"], mask)
    aux = objective.rtd_weight * l_rtd + objective.mlm_weight * gen["mlm_loss"]
    params = [p for name, p in d.named_parameters() if name.startswith(prefixes)]
    flat = [torch.cat([x.flatten() for x in torch.autograd.grad(loss, params, retain_graph=True)]).double()
            for loss in (l_sc + l_z, aux)]
    return float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))


def _losses_with_and_without_measurement(cfg, split, world_size: int) -> list:
    """Each run's losses and gradient norms over STEPS steps; the second run measures after step 1."""
    from megatron.core import parallel_state as ps

    from spactor_mega.curriculum import Phase
    from spactor_mega.model.synthetic import synthetic_batch
    from spactor_mega.parallel.state import destroy_parallel

    runs = []
    for measure in (False, True):
        engine = _engine(cfg, split, world_size)
        dp = ps.get_data_parallel_rank()
        history = []
        for step in range(STEPS):
            batches = [synthetic_batch(2, 16, 6, mlm_slots=4, sp_size=150, seed=100 * step + 10 * dp + i, pad_rows=1)
                       for i in range(cfg.train.global_batch_size // (cfg.train.micro_batch_size * ps.get_data_parallel_world_size()))]
            metrics = engine.train_step(batches, Phase.HYBRID)
            history.append((metrics["loss"], metrics["grad_norm"], metrics["generator_grad_norm"]))
            if measure and step == 0:
                assert math.isfinite(engine.gradient_cosine(_micro_batch()))
                history.append(("left", _gradients_left(engine)))
        runs.append(history)
        del engine
        destroy_parallel(destroy_process_group=False)
    return runs


def _gradients_left(engine) -> float:
    """The largest gradient the engine holds: Megatron DDP's buffers (D, G, the RTD head), or the
    ``.grad`` of DeepSpeed's modules (ZeRO-2 keeps its reduced gradients in buffers of its own)."""
    if hasattr(engine, "d_chunks"):
        return max(float(buffer.grad_data.abs().max()) for model in engine._models() for buffer in model.buffers)
    modules = (engine.d.module, engine.aux.module)
    return max((float(p.grad.abs().max()) for m in modules for p in m.parameters() if p.grad is not None), default=0.0)


def _measure_all(rank, world_size):
    import torch

    from spactor_mega.parallel import collectives
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.plan.flops import gradient_cosine_flops, sample_flops
    from spactor_mega.training import grad_agreement
    from tests.plan.test_flops import flop_counter_mode

    shared = grad_agreement.SHARED_PREFIXES

    out = {"measured": {}, "bf16": {}, "references": {}, "bitwise": {}}
    try:
        for bf16 in (False, True):
            for name, (engine, tp, pp, vp, sp, tied, split) in LAYOUTS.items():
                if bf16 and name not in BF16:
                    continue
                engine_obj = _engine(_config(engine, tp, pp, vp, sp, tied), split, world_size, bf16)
                value = engine_obj.gradient_cosine(_micro_batch())
                # the same value on every rank, bitwise
                every = collectives.all_gather(torch.tensor([value], dtype=torch.float64))
                out["bf16" if bf16 else "measured"][name] = [float(v) for v in every]
                del engine_obj
                destroy_parallel(destroy_process_group=False)
        # the encoder's bias table (its part of the full cosine is below the tolerance) and final
        # norm alone: the table held by both stages, its gradient summed over them and counted once
        grad_agreement.SHARED_PREFIXES = BIAS_TABLE
        name = "megatron-pp2-bias-on-both"
        engine, tp, pp, vp, sp, tied, split = LAYOUTS[name]
        engine_obj = _engine(_config(engine, tp, pp, vp, sp, tied), split, world_size)
        out["bias_table"] = [float(v) for v in collectives.all_gather(
            torch.tensor([engine_obj.gradient_cosine(_micro_batch())], dtype=torch.float64))]
        grad_agreement.SHARED_PREFIXES = shared
        del engine_obj
        destroy_parallel(destroy_process_group=False)
        out["references"]["bias_table"] = _reference(_config("megatron", 1, 1, 1, False, False), BIAS_TABLE)
        destroy_parallel(destroy_process_group=False)
        # the FLOPs of a measurement, counted on each rank of TP = PP = 1, DP = 4: one replica computes
        cfg = _config("megatron", 1, 1, 1, False, False)
        engine_obj = _engine(cfg, None, world_size)
        batch = _micro_batch()
        recompute: list = []
        with flop_counter_mode(recompute) as counter:
            out["measured"]["megatron-dp4"] = [engine_obj.gradient_cosine(batch)]
        out["flops"] = collectives.all_gather(torch.tensor([counter.get_total_flops() - sum(recompute)],
                                                           dtype=torch.float64))
        out["flops"] = [float(v) for v in out["flops"]]
        out["flops_model"] = gradient_cosine_flops(cfg, sample_flops(cfg, 16, 6, VOCAB, 4))
        del engine_obj
        destroy_parallel(destroy_process_group=False)
        for tied in (False, True):
            out["references"][tied] = _reference(_config("megatron", 1, 1, 1, False, tied))
            destroy_parallel(destroy_process_group=False)
        # dropout on; the distributed optimizer with overlapped reduction and gather (DP = 2)
        megatron = _config("megatron", 1, 2, 1, False, False, dropout=0.1)
        p = megatron.parallel
        p.distributed_optimizer = p.overlap_grad_reduce = p.overlap_param_gather = True
        out["bitwise"]["megatron-pp2-dp2"] = _losses_with_and_without_measurement(megatron, None, world_size)
        deepspeed = _config("deepspeed", 1, 1, 1, False, False, dropout=0.1)
        out["bitwise"]["deepspeed-zero2-dp4"] = _losses_with_and_without_measurement(deepspeed, None, world_size)
    finally:
        destroy_parallel()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_all, 4, timeout=600)[0]


@pytest.mark.parametrize("name", [*LAYOUTS, "megatron-dp4"])
def test_the_cosine_is_the_single_process_reference(measured, name):
    values = measured["measured"][name]
    tied = name in LAYOUTS and LAYOUTS[name][5]
    want = measured["references"][tied]
    assert len(set(values)) == 1, values  # every rank has the same value (megatron-dp4: rank 0's alone)
    # relative: the cosines of these tiny models at init are small (~0.01)
    assert values[0] == pytest.approx(want, rel=TOLERANCE), (name, values[0], want)


@pytest.mark.parametrize("name", BF16)
def test_the_cosine_in_bf16_is_near_the_fp32_reference(measured, name):
    values = measured["bf16"][name]
    assert len(set(values)) == 1, values
    assert values[0] == pytest.approx(measured["references"][LAYOUTS[name][5]], rel=BF16_TOLERANCE), values[0]


def test_a_bias_table_held_by_two_stages_counts_once_with_both_stages_gradients(measured):
    values = measured["bias_table"]
    assert len(set(values)) == 1, values
    assert values[0] == pytest.approx(measured["references"]["bias_table"], rel=TOLERANCE)


def test_the_reference_is_not_degenerate(measured):
    """A tied head (the embedding's SC gradient grows by the head's) changes the cosine by far more
    than the tolerance: the tied layout tells a missing copy of the head's gradient apart."""
    untied, tied = measured["references"][False], measured["references"][True]
    assert all(0 < abs(value) < 1 for value in (untied, tied))
    assert abs(untied - tied) > 1e3 * TOLERANCE * abs(untied)


@pytest.mark.parametrize("name", ["megatron-pp2-dp2", "deepspeed-zero2-dp4"])
def test_a_measurement_leaves_training_bitwise_unchanged(measured, name):
    without, with_measurement = measured["bitwise"][name]
    assert with_measurement.pop(1) == ("left", 0.0)  # no gradient left behind
    assert with_measurement == without


def test_a_measurement_costs_what_the_flops_model_says(measured):
    """FlopCounterMode's matmuls (less the CPU flash kernel's recompute, as in tests/plan/test_flops.py)
    of one measurement: the FLOPs model's two hybrid passes of the micro-batch, on one DP replica only."""
    first, *others = measured["flops"]
    assert first == pytest.approx(measured["flops_model"], rel=1e-12)
    assert others == [0.0, 0.0, 0.0]


def test_the_interleaved_schedule_runs_the_micro_batch_pp_times():
    from spactor_mega.model.synthetic import tiny_config
    from spactor_mega.plan.flops import gradient_cosine_flops, sample_flops

    cfg = tiny_config()
    flops = sample_flops(cfg, 32, 8, VOCAB, 6)
    plain = gradient_cosine_flops(cfg, flops)
    cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size = 2, 2
    assert gradient_cosine_flops(cfg, flops) == 2 * plain
