"""bf16 training on CPU, both engines: bf16 weights and activations with fp32 master weights, fp32
optimizer state and fp32 gradient reduction; losses that follow the fp32 run; bitwise resume.

Two launches train every configuration in turn (module fixtures) and inspect each live engine after
its run: 2 processes (DP = 2, 2 micro-batches per rank, so gradients are accumulated and all-reduced)
for the Megatron engine (AdamW, Adafactor) and the DeepSpeed engine (ZeRO 0-3, ZeRO-2 with CPU
optimizer offload, Adafactor under ZeRO-0), and 4 processes for the Megatron engine under TP = 2 x
PP = 2. The T5 variants an import brings train there too: gated-SiLU with a bias table per layer
(UMT5's) at DP = 2, T5 v1.0's ReLU with the tied, rescaled head at TP = 2 x PP = 2 (where the last
stage holds a copy of the embedding). Every run is 12 steps with tau = 6; the stopped runs stop at
step 4 (before tau, so the checkpoint holds G, the RTD head and their optimizer) and resume across tau.
The DeepSpeed AdamW runs are compared with the ZeRO-2 fp32 run (in fp32 the ZeRO stages give the same
losses to 1e-5, tests/training/test_deepspeed.py).

Tolerance: a bf16 run's loss is within BF16_REL (relative) of the fp32 run's at every step. Measured
max over 20 steps (tau 10; the suite now runs 12, for its time), three measurements: 2.6e-4 (Megatron AdamW; Adafactor 6e-5; ZeRO 1-3 and
offload 2e-4; TP = 2 x PP = 2 1.9e-4; over the 12 steps, gated-SiLU with per-layer tables 1.2e-4, ReLU with
the tied head at TP = 2 x PP = 2 4.9e-5), so BF16_REL = 2e-3. DeepSpeed ZeRO-0 accumulates micro-batch
gradients in the bf16 ``.grad`` (DeepSpeed 0.19.8 refuses fp32 accumulation without ZeRO) and
measured 4.7e-3: ZERO0_BF16_REL = 2e-2.
"""

import json
import math
from pathlib import Path

import pytest

from spactor_mega.config import ConfigError

from spactor_mega.plan.derived import uses_bf16

from spactor_mega.plan.validate import validate
from spactor_mega.parallel.testing import run_distributed
from tests.training.engine_runs import train_and_inspect
from tests.training.test_training import tiny_config

STEPS, TAU, STOP = 12, 6, 4
BF16_REL, ZERO0_BF16_REL = 2e-3, 2e-2
ZERO = {
    "zero0": dict(zero_stage=0),
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "zero2_offload": dict(zero_stage=2, offload_optimizer="cpu"),
}
RESUMED = ("megatron_adamw", "megatron_adafactor", "zero2")  # also stopped at STOP and resumed in bf16
# The T5 variants of an import (model options beside the default v1.1's)
SILU_BIAS_PER_LAYER = dict(model__feed_forward="gated-silu", model__relative_attention_per_layer=True,
                           model__hf_model_type="umt5")
RELU_TIED = dict(model__feed_forward="relu", model__tie_word_embeddings=True)
# The fp32 run each bf16 run is compared with (its own where not named here).
REFERENCE = {name: "zero2" for name in ZERO}


def _config(work: Path, name: str, precision: str, optimizer: str = "adamw", zero: dict | None = None, **overrides):
    fields = dict(train__steps=STEPS, spactor__tau=TAU, train__micro_batch_size=2, train__precision=precision,
                  optim__optimizer=optimizer)
    cfg = tiny_config(work / f"{name}_{precision}", **{**fields, **overrides})
    if zero is not None:
        cfg.train.engine = "deepspeed"
        if optimizer == "adamw":  # torch's AdamW for offloaded states too (DeepSpeedCPUAdam's JIT build takes a minute)
            cfg.deepspeed.config = str(work / "torch_adam.json")
        for key, value in zero.items():
            setattr(cfg.deepspeed, key, value)
    return cfg


def _runs(work: Path, name: str, optimizer: str = "adamw", zero: dict | None = None, resumed: bool = False, **overrides):
    """(run name, config): bf16, fp32 unless another run is the reference, and with ``resumed`` bf16
    stopped at STOP and resumed."""
    precisions = ("bf16",) if REFERENCE.get(name, name) != name else ("fp32", "bf16")
    runs = [(f"{name}_{p}", _config(work, name, p, optimizer, zero, **overrides)) for p in precisions]
    if resumed:
        runs += [(f"{name}_stopped", _config(work, f"{name}_stop", "bf16", optimizer, zero, train__exit_interval=STOP,
                                             **overrides)),
                 (f"{name}_resumed", _config(work, f"{name}_stop", "bf16", optimizer, zero, train__resume="auto",
                                             **overrides))]
    return runs


def _megatron_precision(engine) -> list[dict]:
    """What each of this rank's Megatron optimizers (D's; G + RTD head's until tau) holds."""
    import torch

    found = []
    for optimizer, models in ((engine.d_optimizer, engine.d_chunks),
                              (engine.aux_optimizer, [m for m in (engine.g, engine.rtd) if m is not None])):
        if optimizer is None or not models:
            continue
        params = [p for m in models for p in m.module.parameters()]
        parts = [p for p in getattr(optimizer, "chained_optimizers", [optimizer]) if not p.is_stub_optimizer]
        model = [p for part in parts for group in part.float16_groups for p in group]
        master = [p for part in parts for group in part.fp32_from_float16_groups for p in group]
        stepped = [p for part in parts for group in part.optimizer.param_groups for p in group["params"]]
        state = [v for part in parts for s in part.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        found.append({
            "model": {str(p.dtype) for p in params},
            "main_grad": {str(p.main_grad.dtype) for p in params},
            "grad_reduce_in_fp32": {m.ddp_config.grad_reduce_in_fp32 for m in models},
            "master": {str(p.dtype) for p in master},
            "every_param_has_a_master": sorted(map(id, model)) == sorted(map(id, params)) and len(master) == len(model),
            "optimizer_steps_the_masters": sorted(map(id, stepped)) == sorted(map(id, master)),
            "model_is_its_master_rounded": all(torch.equal(p, m.to(p.dtype)) for p, m in zip(model, master)),
            "state": {str(v.dtype) for v in state},
        })
    return found


def _deepspeed_precision(engine) -> list[dict]:
    """What each of this rank's DeepSpeed engines (D's; G + RTD head's until tau) holds."""
    import torch

    found = []
    for ds in (e for e in (engine.d, engine.aux) if e is not None):
        optimizer = ds.optimizer
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3's fp32 partitions
            master = optimizer.fp32_partitioned_groups_flat
        else:  # the other wrappers hand the torch optimizer fp32 copies (flat partitions under ZeRO 1-2)
            master = [p for group in ds.basic_optimizer.param_groups for p in group["params"]]
        state = [v for s in ds.basic_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        found.append({
            "model": {str(p.dtype) for p in ds.module.parameters()},
            "master": {str(p.dtype) for p in master},
            "master_numel": sum(p.numel() for p in master),
            "state": {str(v.dtype) for v in state},
            "model_and_accumulation_dtypes": tuple(str(t) for t in ds.get_data_types()),
            "communication": str(ds.communication_data_type),
        })
    return found


def _inspect(cfg, result, engine) -> dict:
    """This rank's losses and stages and, for bf16 runs, what its live engine holds."""
    history = result.history
    inspect = _deepspeed_precision if cfg.train.engine == "deepspeed" else _megatron_precision
    return {"steps": [h["step"] for h in history], "stages": [h["phase"] for h in history],
            "losses": [h["loss"] for h in history], "precision": inspect(engine) if uses_bf16(cfg) else None}


def _train_and_inspect(rank, world_size, runs):
    return train_and_inspect(runs, _inspect)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """DP = 2: the Megatron engine (AdamW, Adafactor) and the DeepSpeed engine (ZeRO 0-3, offload,
    Adafactor under ZeRO-0); rank 0's results."""
    work = tmp_path_factory.mktemp("bf16_dp2")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    runs = _runs(work, "megatron_adamw", resumed=True) + _runs(work, "megatron_adafactor", "adafactor", resumed=True)
    for name, zero in ZERO.items():
        runs += _runs(work, name, zero=zero, resumed=name in RESUMED)
    runs += _runs(work, "zero0_adafactor", "adafactor", zero=ZERO["zero0"])
    runs += _runs(work, "megatron_silu_bias_per_layer", **SILU_BIAS_PER_LAYER)
    return run_distributed(_train_and_inspect, 2, runs, timeout=1200)[0]


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    """TP = 2 x PP = 2 (4 processes), the Megatron engine with AdamW and Adafactor; every rank's results."""
    work = tmp_path_factory.mktemp("bf16_tp2pp2")
    layout = dict(parallel__tensor_model_parallel_size=2, parallel__pipeline_model_parallel_size=2,
                  train__micro_batch_size=4)
    runs = _runs(work, "tp2pp2_adamw", **layout) + _runs(work, "tp2pp2_adafactor", "adafactor", **layout)
    runs += _runs(work, "tp2pp2_relu_tied", **RELU_TIED, **layout)
    return run_distributed(_train_and_inspect, 4, runs, timeout=1200)


DP2_RUNS = ["megatron_adamw", "megatron_adafactor", *ZERO, "zero0_adafactor", "megatron_silu_bias_per_layer"]
TP2PP2_RUNS = ["tp2pp2_adamw", "tp2pp2_adafactor", "tp2pp2_relu_tied"]


def _follows_fp32(results: dict, name: str) -> None:
    reference, run = results[f"{REFERENCE.get(name, name)}_fp32"], results[f"{name}_bf16"]
    rel = ZERO0_BF16_REL if name.startswith("zero0") else BF16_REL
    assert run["steps"] == list(range(1, STEPS + 1))
    assert run["stages"] == reference["stages"] == [1.0] * TAU + [2.0] * (STEPS - TAU)
    for step, want, have in zip(run["steps"], reference["losses"], run["losses"]):
        assert math.isfinite(have) and abs(have - want) <= rel * abs(want), (name, step, want, have)
    assert run["losses"] != reference["losses"]  # it did train in bf16


@pytest.mark.parametrize("name", DP2_RUNS)
def test_bf16_losses_follow_fp32_across_tau(dp2, name):
    _follows_fp32(dp2, name)


@pytest.mark.parametrize("name", TP2PP2_RUNS)
def test_bf16_losses_follow_fp32_across_tau_under_tp2_pp2(tp2pp2, name):
    for rank_results in tp2pp2:
        _follows_fp32(rank_results, name)


def _assert_megatron_mixed_precision(found: list[dict]) -> None:
    assert found
    for optimizer in found:
        assert optimizer["model"] == {"torch.bfloat16"}
        assert optimizer["main_grad"] == {"torch.float32"} and optimizer["grad_reduce_in_fp32"] == {True}
        assert optimizer["master"] == {"torch.float32"} and optimizer["state"] == {"torch.float32"}
        assert optimizer["every_param_has_a_master"] and optimizer["optimizer_steps_the_masters"]
        assert optimizer["model_is_its_master_rounded"]


@pytest.mark.parametrize("name", ["megatron_adamw", "megatron_adafactor"])
def test_megatron_keeps_fp32_masters_state_and_gradients_for_bf16_params(dp2, name):
    """After the run (D) and at the stop before tau (D, and G + RTD head): bf16 parameters whose
    fp32 masters the optimizer steps, fp32 optimizer state, fp32 gradient buffers (DDP's
    grad_reduce_in_fp32), and parameters equal to their masters rounded to bf16."""
    assert len(dp2[f"{name}_stopped"]["precision"]) == 2
    for run in (f"{name}_bf16", f"{name}_stopped", f"{name}_resumed"):
        _assert_megatron_mixed_precision(dp2[run]["precision"])


@pytest.mark.parametrize("name", TP2PP2_RUNS)
def test_megatron_keeps_fp32_masters_under_tp2_pp2(tp2pp2, name):
    for rank_results in tp2pp2:
        _assert_megatron_mixed_precision(rank_results[f"{name}_bf16"]["precision"])


@pytest.mark.parametrize("name", [*ZERO, "zero0_adafactor"])
def test_deepspeed_keeps_fp32_masters_state_and_gradient_reduction(dp2, name):
    """bf16 module parameters; fp32 master weights (partitions under ZeRO 1-3) and optimizer state;
    gradients reduced in fp32, and accumulated in fp32 under ZeRO 1-3 (in bf16 under ZeRO-0)."""
    runs = [f"{name}_bf16"] + ([f"{name}_stopped"] if name in RESUMED else [])
    for run in runs:
        for engine in dp2[run]["precision"]:
            assert engine["model"] == {"torch.bfloat16"}
            assert engine["master"] == {"torch.float32"} and engine["master_numel"] > 0
            assert engine["state"] == {"torch.float32"}
            zero_stage = ZERO[name.removesuffix("_adafactor")]["zero_stage"]
            accumulation = "torch.bfloat16" if zero_stage == 0 else "torch.float32"
            assert engine["model_and_accumulation_dtypes"] == ("torch.bfloat16", accumulation)
            assert engine["communication"] == "torch.float32"
    if name in RESUMED:
        assert len(dp2[f"{name}_stopped"]["precision"]) == 2  # D's engine and G + RTD head's


@pytest.mark.parametrize("name", RESUMED)
def test_bf16_resume_is_bitwise_identical_across_tau(dp2, name):
    full, first, second = dp2[f"{name}_bf16"], dp2[f"{name}_stopped"], dp2[f"{name}_resumed"]
    assert first["steps"] == list(range(1, STOP + 1)) and second["steps"] == list(range(STOP + 1, STEPS + 1))
    assert first["losses"] + second["losses"] == full["losses"]


def test_deepspeed_zero0_adafactor_follows_the_megatron_engine(dp2):
    """DeepSpeed keeps tensors whole only without ZeRO, so Adafactor runs there: in fp32 it gives the
    Megatron engine's Adafactor losses (1e-5, as the ZeRO stages do for AdamW)."""
    for want, have in zip(dp2["megatron_adafactor_fp32"]["losses"], dp2["zero0_adafactor_fp32"]["losses"]):
        assert have == pytest.approx(want, rel=1e-5)


def test_precision_and_optimizer_rejections_name_the_field(tmp_path, monkeypatch):
    import torch

    def rejected(message, world=2, **overrides):
        with pytest.raises(ConfigError, match=message):
            validate(tiny_config(tmp_path, **overrides), world)

    rejected(r"train\.precision must be auto, fp32 or bf16, got 'fp16' \(fp16 is not offered", train__precision="fp16")
    rejected(r"optim\.optimizer=adafactor cannot run under deepspeed\.zero_stage=2: ZeRO 1-3 flatten the parameters "
             r"into 1-D partitions, .*use train\.engine=megatron", train__engine="deepspeed", optim__optimizer="adafactor")
    (tmp_path / "adam.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    rejected(r"remove 'optimizer': optim\.optimizer=adafactor is torch's optimizer", train__engine="deepspeed",
             optim__optimizer="adafactor", deepspeed__zero_stage=0, deepspeed__config=str(tmp_path / "adam.json"))
    validate(tiny_config(tmp_path, train__engine="deepspeed", optim__optimizer="adafactor", deepspeed__zero_stage=0), 2)

    # auto resolves: fp32 on this CPU, bf16 on a GPU with native bf16; bf16 asked of a GPU that cannot is refused.
    assert not uses_bf16(tiny_config(tmp_path)) and uses_bf16(tiny_config(tmp_path, train__precision="bf16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "an old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert uses_bf16(tiny_config(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert not uses_bf16(tiny_config(tmp_path))
    rejected(r"train\.precision=bf16: this GPU \(an old GPU\) cannot compute in bf16; use train\.precision=fp32",
             train__precision="bf16")
