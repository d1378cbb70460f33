"""The scale model of ``--dry-run``: its pieces against their definitions, and its communication
volumes against the bytes the real Megatron engine hands to gloo in a step (counted by wrapping
torch.distributed's collectives, :mod:`spactor_mega.parallel.comm_count`)."""

import dataclasses
import math

import pytest

from spactor_mega.config import Config, ConfigError, load_yaml
from spactor_mega.plan.dry_run import describe, parameter_counts
from spactor_mega.plan.engines import megatron as megatron_plan
from spactor_mega.plan.flops import sample_flops
from spactor_mega.plan.inventory import count, t5_parameter_shapes
from spactor_mega.plan.layout import bubble_fraction
from spactor_mega.plan.scale import (
    dp_traffic,
    hardware,
    pipeline_schedule,
    predict,
    recompute_flops,
    sample_lengths,
    scale_layout,
    stage_parameters,
)
from spactor_mega.parallel.testing import run_distributed

T5_XL = "configs/t5-xl.yaml"
H100 = hardware("H100")


def _xl(**parallel) -> Config:
    cfg = load_yaml(T5_XL)
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    return cfg


@pytest.mark.parametrize("p, m, v", [(1, 4, 1), (2, 1, 1), (2, 8, 1), (4, 4, 1), (4, 8, 2), (2, 4, 2)])
def test_equal_stages_give_the_bubble_formula(p, m, v):
    step, idle = pipeline_schedule([1.0] * p, m, v)
    assert step == pytest.approx(m + (p - 1) / v)
    assert idle == pytest.approx([bubble_fraction(p, m, v)] * p)


def test_the_slowest_stage_sets_the_pace():
    step, idle = pipeline_schedule([1.0, 3.0], 4)  # fill: 1 + 3, then 3 more micro-batches at 3
    assert step == pytest.approx(13.0)
    assert idle == pytest.approx([1 - 4 / 13, 1 - 12 / 13])


def test_full_recompute_repeats_one_forward_of_the_layers():
    cfg = load_yaml(T5_XL)
    se, sd, _ = sample_lengths(cfg)
    layers_only = sample_flops(cfg, se, sd, 0, 0).discriminator  # no LM head
    assert recompute_flops(cfg, 24, 24, se, sd, "full") == pytest.approx(layers_only / 3)
    cfg.model.recompute_method, cfg.model.recompute_num_layers = "block", 2
    two_each = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_encoder_layers=2, num_decoder_layers=2))
    assert recompute_flops(cfg, 24, 24, se, sd, "full") == pytest.approx(
        sample_flops(two_each, se, sd, 0, 0).discriminator / 3)
    assert 0 == recompute_flops(cfg, 24, 24, se, sd, "none") < recompute_flops(cfg, 24, 24, se, sd, "selective")


def test_distributed_optimizer_shards_only_the_optimizer_state():
    cfg = _xl()
    cfg.optim.optimizer, cfg.train.precision = "adamw", "bf16"
    replicated = megatron_plan.model_state_bytes(cfg, 1000, 8)["gpu"]
    cfg.parallel.distributed_optimizer = True
    sharded = megatron_plan.model_state_bytes(cfg, 1000, 8)["gpu"]
    assert replicated == {"params": 2000, "grads": 4000, "optimizer": 12000}  # bf16, fp32 grads, moments + masters
    assert sharded == {"params": 2000, "grads": 4000, "optimizer": 1500}


def test_dp_traffic_payloads_and_ring_factors():
    (reduce,) = dp_traffic(1000, 4, False, 2, span=32, hw=H100)
    assert (reduce.collective, reduce.payload_bytes, reduce.wire_bytes) == ("all-reduce", 4000, 6000)
    assert reduce.link == "network" and reduce.seconds == pytest.approx(6000 / 50e9)
    scatter, gather = dp_traffic(1000, 4, True, 2, span=4, hw=H100)
    assert (scatter.collective, scatter.payload_bytes, scatter.wire_bytes) == ("reduce-scatter", 4000, 3000)
    assert (gather.collective, gather.payload_bytes, gather.wire_bytes) == ("all-gather", 2000, 1500)
    assert gather.link == "NVLink" and dp_traffic(1000, 1, False, 2, span=1, hw=H100) == []


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 4), (4, 2)])
def test_stage_parameters_split_the_model(tp, pp):
    cfg = _xl(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    layout = scale_layout(cfg, tp * pp, 32128)
    per_stage = [stage_parameters(cfg, layout, s, 32128) for s in range(pp)]
    shapes = t5_parameter_shapes(cfg.model, 32128)
    norms = count({k: v for k, v in shapes.items() if "layernorm" in k})
    tables = count({k: v for k, v in shapes.items() if "relative_attention_bias" in k})
    # every stage holding a stack keeps a copy of its bias table and final norm
    stacks = sum(bool(len(s.encoder_layers)) + bool(len(s.decoder_layers)) for s in layout.stages.stages) - 2
    d = cfg.model.d_model
    expected = (count(shapes) - norms + stacks * tables // 2) // tp + norms + stacks * d
    assert sum(per_stage) == pytest.approx(expected, abs=pp * tp)
    if tp == pp == 1:
        assert per_stage == [parameter_counts(cfg, 32128)["discriminator"]]


def test_t5_xl_at_64_gpus():
    cfg = _xl(distributed_optimizer=True)
    cfg.model.recompute, cfg.optim.optimizer = "selective", "adamw"
    prediction = predict(cfg, 64, H100)
    assert prediction.layout.describe().startswith("TP 1 x PP 1 x DP 64")
    d = parameter_counts(cfg, 32128)["discriminator"]
    scatter, gather = [t for t in prediction.traffic["sc_only"] if t.parallelism == "DP"]
    assert (scatter.payload_bytes, gather.payload_bytes) == (4 * d, 2 * d)  # fp32 gradients, bf16 parameters
    (reduce,) = prediction.traffic_other_optimizer
    assert reduce.payload_bytes == 4 * d and reduce.wire_bytes == pytest.approx(2 * 63 / 64 * 4 * d)
    memory = prediction.memory.activations
    assert memory["full"] < memory["selective"] < memory["none"]
    sc = prediction.times["sc_only"]
    se, sd, mlm = sample_lengths(cfg)
    assert sc.model_flops == pytest.approx(sample_flops(cfg, se, sd, 32128, mlm).sc_only * 2048)
    assert 0 < sc.mfu < H100.efficiency


def test_sequence_parallel_shrinks_the_activations():
    plain = predict(_xl(tensor_model_parallel_size=4), 256, H100).memory
    sp = predict(_xl(tensor_model_parallel_size=4, sequence_parallel=True), 256, H100).memory
    assert sp.activations["none"] < plain.activations["none"]


def test_dry_run_prints_the_scale_model():
    cfg = _xl(tensor_model_parallel_size=2)
    text = describe(cfg, world_size=128, hardware=H100)
    assert "scale model on H100 989 TFLOP/s" in text
    assert "layout: TP 2 x PP 1 x DP 64 = 128 GPUs" in text
    assert "MFU" in text and "TP all-reduce" in text and "DP with the distributed optimizer" in text
    with pytest.raises(ConfigError, match="--gpu"):
        hardware("V100")


# ---- counted on the real engine (tools/bench_scale.py runs these at TP = 2 x DP = 2 too) ----------

VOCAB = 256  # padded rows of the tiny model
KINDS = {"all-reduce": "all_reduce", "reduce-scatter": "reduce_scatter", "all-gather": "all_gather"}


def tiny_config(tp: int, dp: int, distributed_optimizer: bool) -> Config:
    from spactor_mega.model.synthetic import tiny_config

    cfg = tiny_config()
    cfg.data.encoder_seq_length = 32
    cfg.train.precision = "fp32"
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 2 * dp
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.distributed_optimizer = distributed_optimizer
    return cfg


def count_step_collectives(rank, world_size, tp, optimizers):
    """{(distributed optimizer, phase): {group: {collective: payload bytes}}} of this rank's
    collectives in one train step on the Megatron engine (G released before the SC-only step, as at
    tau); groups by their ranks: "TP", "DP", "TP x DP" (at TP = 1 the last is the DP group)."""
    import torch
    from megatron.core import parallel_state as ps

    from spactor_mega.curriculum import Phase
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch
    from spactor_mega.parallel.comm_count import CollectiveCounter
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine

    def ranks(group):
        return tuple(torch.distributed.get_process_group_ranks(group))

    out = {}
    for distributed_optimizer in optimizers:
        initialize_parallel(tp=tp, seed=3)
        cfg = tiny_config(tp, world_size // tp, distributed_optimizer)
        se, sd, mlm = sample_lengths(cfg)
        objective = SpactorObjective(mask_id=250, sample_vocab_size=150)
        engine = build_engine(cfg, *build_spactor_modules(cfg, VOCAB), objective, False)
        groups = {"TP": ranks(ps.get_tensor_model_parallel_group()), "DP": ranks(ps.get_data_parallel_group()),
                  "TP x DP": ranks(ps.get_tensor_and_data_parallel_group())}
        for phase in (Phase.HYBRID, Phase.SC_ONLY):
            if phase is Phase.SC_ONLY:
                engine.release_generator()
            batch = synthetic_batch(2, se, sd, mlm_slots=mlm, seed=rank, with_mlm=phase is Phase.HYBRID)
            with CollectiveCounter() as counter:
                engine.train_step([batch], phase)
            out[(distributed_optimizer, phase.name.lower())] = {g: counter.bytes(r) for g, r in groups.items()}
        destroy_parallel(destroy_process_group=False)
    return out


def predicted_bytes(tp: int, dp: int, distributed_optimizer: bool, phase: str) -> dict:
    """The scale model's payloads for :func:`count_step_collectives`'s setup, in its form."""
    prediction = predict(tiny_config(tp, dp, distributed_optimizer), tp * dp, H100, vocab_size=VOCAB)
    group = {"TP": "TP", "DP": "DP", "DP (RTD head)": "DP", "DP (G)": "TP x DP" if tp > 1 else "DP"}
    out = {"TP": {}, "DP": {}, "TP x DP": {}}
    for t in prediction.traffic[phase]:
        totals = out[group[t.parallelism]]
        totals[KINDS[t.collective]] = totals.get(KINDS[t.collective], 0) + t.payload_bytes
    return out


def padding_bound(cfg: Config, dp: int) -> int:
    """Bytes Megatron's distributed optimizer may add to D's buffer: each parameter starts at a
    multiple of 64 elements, the buffer ends at a multiple of lcm(DP, 128) (fp32 here)."""
    return 4 * (64 * len(t5_parameter_shapes(cfg.model, VOCAB)) + math.lcm(dp, 128))


@pytest.fixture(scope="module")
def counted():
    """DP = 2 on 2 gloo processes, plain DP and the distributed optimizer."""
    return run_distributed(count_step_collectives, 2, 1, (False, True), timeout=600)[0]


# The engines' per-step agreement on a non-finite step (spactor_mega.training.nonfinite): one int64
# flag all-reduced over the world, which in these DP-only runs is the DP group.
STEP_AGREEMENT_BYTES = 8


@pytest.mark.parametrize("phase", ["hybrid", "sc_only"])
def test_dp_bytes_of_a_step_are_the_predicted_ones(counted, phase):
    """Plain DP: D's, G's and the RTD head's fp32 gradient buffers all-reduced, byte for byte."""
    measured, predicted = counted[(False, phase)]["DP"], predicted_bytes(1, 2, False, phase)["DP"]
    assert measured == {"all_reduce": predicted["all_reduce"] + STEP_AGREEMENT_BYTES}


@pytest.mark.parametrize("phase", ["hybrid", "sc_only"])
def test_distributed_optimizer_bytes_are_the_predicted_ones(counted, phase):
    """Distributed optimizer: D's gradients reduce-scattered and its parameters all-gathered, up to
    Megatron's padding of the buffer; G's and the RTD head's still all-reduced (plus the grad-norm
    scalar the distributed optimizer reduces over its DP group)."""
    measured, predicted = counted[(True, phase)]["DP"], predicted_bytes(1, 2, True, phase)["DP"]
    padding = padding_bound(tiny_config(1, 2, True), 2)
    for kind in ("reduce_scatter", "all_gather"):
        assert predicted[kind] <= measured[kind] <= predicted[kind] + padding, (kind, measured, predicted)
    extra = measured.get("all_reduce", 0) - predicted.get("all_reduce", 0) - STEP_AGREEMENT_BYTES
    assert 0 <= extra <= 2 * 4  # fp32 grad-norm scalars
