"""The trainer end to end on tiny models: exact resume across tau, the stage switch, learning."""

import dataclasses
import math
from pathlib import Path

import pytest

from spactor_mega.config import Config, ConfigError, set_field
from spactor_mega.curriculum import Phase

from spactor_mega.plan.validate import validate
from spactor_mega.parallel.testing import run_distributed

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo_c4"


def tiny_config(work: Path, **overrides) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(
        cfg.model, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=4, num_decoder_layers=2,
        make_vocab_size_divisible_by=8,
    )
    cfg.data = dataclasses.replace(
        cfg.data, tokenizer=str(work.parent / "tokenizer"), tokenizer_vocab_size=600,
        train_corpus=[str(DEMO / "c4-validation.*.json.gz")], train_data=[str(work.parent / "data" / "valid_docs")],
        split="95,5,0", encoder_seq_length=32, preprocess_workers=1,
    )
    cfg.spactor.tau = 4
    cfg.optim = dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=2)
    cfg.train = dataclasses.replace(
        cfg.train, steps=8, global_batch_size=8, micro_batch_size=4, save_dir=str(work / "ckpt"),
        save_interval=0, eval_interval=0, eval_batches=2, seed=7,
    )
    cfg.logging = dataclasses.replace(cfg.logging, tensorboard_dir=str(work / "tb"), progress=False, log_interval=1000)
    for key, value in overrides.items():  # section__field or section__sub__field
        set_field(cfg, key.replace("__", "."), value)
    return cfg


def _train(rank, world_size, cfg):
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    try:
        result = train(cfg)
    finally:
        destroy_parallel()
    return {"history": result.history, "evals": result.evals, "checkpoint": str(result.checkpoint)}


def run(cfg, world_size=1):
    return run_distributed(_train, world_size, cfg, timeout=600)[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train") / "run"


_UNINTERRUPTED: dict = {}  # optimizer -> the uninterrupted run, shared by the stop points


@pytest.mark.parametrize("stop_at, optimizer", [(3, "adamw"), (6, "adamw"), (3, "adafactor")])  # tau = 4
def test_resume_gives_bitwise_the_same_losses(work, stop_at, optimizer):
    name = f"{optimizer}{stop_at}"
    if optimizer not in _UNINTERRUPTED:
        _UNINTERRUPTED[optimizer] = run(tiny_config(work / f"full{optimizer}", optim__optimizer=optimizer))
    full = _UNINTERRUPTED[optimizer]
    first = run(tiny_config(work / f"part{name}", train__exit_interval=stop_at, optim__optimizer=optimizer))
    assert [h["step"] for h in first["history"]] == list(range(1, stop_at + 1))
    second = run(tiny_config(work / f"part{name}", train__resume="auto", optim__optimizer=optimizer))
    resumed = first["history"] + second["history"]
    assert [h["step"] for h in resumed] == list(range(1, 9))
    for a, b in zip(full["history"], resumed):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])


def test_generator_is_released_at_tau(work):
    history = run(tiny_config(work / "tau", train__peak_tflops=0.5))["history"]
    # MFU: the FLOPs model's FLOPs per second per device over the declared peak (G counted before tau)
    for h in history:
        assert h["mfu"] == pytest.approx(h["flops_per_step"] / h["step_time_s"] / 0.5e12, rel=1e-9)
    stages = [h["phase"] for h in history]
    assert stages == [1.0] * 4 + [2.0] * 4
    assert all(h["generator_params"] > 0 for h in history[:4])
    assert all(h["generator_params"] == 0 and h["generator_optimizer_state"] == 0 for h in history[4:])
    assert all("rtd_loss" in h for h in history[:4]) and not any("rtd_loss" in h for h in history[4:])


def test_loader_workers_give_bitwise_the_same_losses(work):
    """Micro-batches built ahead by 2 DataLoader workers train exactly as those built in the step
    (across tau: the workers decide each micro-batch's MLM fields); the wait for them is logged."""
    in_step = run(tiny_config(work / "workers0"))["history"]
    ahead = run(tiny_config(work / "workers2", data__num_workers=2))["history"]
    assert [h["loss"] for h in ahead] == [h["loss"] for h in in_step]
    assert [h["phase"] for h in ahead] == [1.0] * 4 + [2.0] * 4
    assert all(h["data_wait_s"] >= 0 for h in in_step + ahead)


def test_validation_loss_falls_on_the_demo_corpus(work):
    cfg = tiny_config(work / "learn", train__steps=60, train__eval_interval=60, spactor__tau=30)
    evals = run(cfg)["evals"]
    start, end = evals[0]["sc_loss"], evals[-1]["sc_loss"]
    assert end < start - 1.0, (start, end)


def test_validation_sc_loss_is_on_clean_inputs_before_tau(work):
    """valid/sc_loss before tau is D's SC loss on the clean inputs: the same weights (4 hybrid
    steps in both runs) give the same value whether the next step is hybrid (tau 8: the hybrid
    terms are reported beside it) or SC only (tau 4)."""
    entering_sc = run(tiny_config(work / "eval_tau4", train__steps=4, train__eval_interval=4))["evals"]
    entering_hybrid = run(tiny_config(work / "eval_tau8", train__steps=4, train__eval_interval=4,
                                      spactor__tau=8.0))["evals"]
    assert [e["step"] for e in entering_sc] == [e["step"] for e in entering_hybrid] == [0, 4]
    sc, hybrid = entering_sc[-1], entering_hybrid[-1]
    assert set(sc) == {"step", "sc_loss", "sc_accuracy"}
    assert {"sc_loss", "sc_loss_replaced", "rtd_loss", "mlm_loss", "hybrid_loss", "rtd_recall"} <= set(hybrid)
    assert hybrid["sc_loss"] == sc["sc_loss"] and hybrid["sc_accuracy"] == sc["sc_accuracy"]
    assert hybrid["sc_loss_replaced"] != hybrid["sc_loss"]  # D reading G's replacements is another curve
    # the signals of spactor_mega/training/tau_signals.py, from the same evaluation
    p = hybrid["replaced_fraction"]
    prior = -p * math.log(p) - (1 - p) * math.log(1 - p)
    assert hybrid["rtd_prior_entropy"] == pytest.approx(prior, rel=1e-12)
    assert hybrid["rtd_info_gain"] == pytest.approx(prior - hybrid["rtd_loss"], rel=1e-12)
    assert hybrid["rtd_info_gain_fraction"] == pytest.approx(hybrid["rtd_info_gain"] / prior, rel=1e-12)
    assert hybrid["sc_replaced_gap"] == pytest.approx(hybrid["sc_loss_replaced"] - hybrid["sc_loss"], rel=1e-12)
    assert not {"rtd_info_gain", "sc_replaced_gap"} & set(sc)  # hybrid evaluations only


def test_config_rejections_name_the_field(tmp_path):
    cases = [
        ({"model__num_heads": 3}, 2, "model.num_heads=3 is not divisible by parallel.tensor_model_parallel_size=2"),
        ({"spactor__tau": -1.0}, 1, "spactor.tau must be >= 0"),
        ({"spactor__rtd_weight": -0.5}, 1, "spactor.rtd_weight must be >= 0"),
        ({"spactor__mlm_weight": -1.0}, 1, "spactor.mlm_weight must be >= 0"),
        ({"data__prefetch_factor": 0}, 1, "data.num_workers must be >= 0 and data.prefetch_factor >= 1, got 0 and 0"),
        ({"train__global_batch_size": 10}, 1, "train.global_batch_size=10 is not divisible by micro_batch_size"),
        ({"parallel__pipeline_model_parallel_size": 7}, 7, "pipeline_model_parallel_size=7 exceeds the 6"),
        ({"parallel__virtual_pipeline_model_parallel_size": 2}, 1,
         "virtual_pipeline_model_parallel_size=2 needs parallel.pipeline_model_parallel_size > 1"),
        ({"parallel__pipeline_model_parallel_size": 2, "parallel__virtual_pipeline_model_parallel_size": 2}, 4,
         "the 1 micro-batches per step (train.global_batch_size / (micro_batch_size x DP)) must be a multiple of "
         "parallel.pipeline_model_parallel_size=2"),
        ({"parallel__pipeline_model_parallel_size": 4, "parallel__virtual_pipeline_model_parallel_size": 2,
          "train__global_batch_size": 16}, 4,
         "parallel.pipeline_model_parallel_size=4 x parallel.virtual_pipeline_model_parallel_size=2 stages exceed "
         "the 6 transformer layers"),
        ({"parallel__pipeline_model_parallel_size": 2, "parallel__virtual_pipeline_model_parallel_size": 2,
          "train__eval_interval": 4, "train__eval_batches": 3}, 2,
         "train.eval_batches=3 must be a multiple of parallel.pipeline_model_parallel_size=2"),
        ({"model__recompute": "full", "model__recompute_num_layers": 3}, 1,
         "model.recompute_num_layers=3 does not divide the 4 layers of the encoder"),
        ({"model__recompute": "full", "model__recompute_method": "blocks"}, 1, "model.recompute_method must be uniform or block"),
        ({"parallel__sequence_parallel": True}, 1, "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1"),
        ({"parallel__overlap_param_gather": True}, 1, "parallel.overlap_param_gather needs parallel.distributed_optimizer"),
        ({"parallel__distributed_optimizer": True, "optim__optimizer": "adafactor"}, 2,
         "parallel.distributed_optimizer cannot shard optim.optimizer=adafactor"),
        ({"parallel__distributed_optimizer": True, "train__engine": "deepspeed"}, 1,
         "parallel.distributed_optimizer is a Megatron engine setting"),
        ({"parallel__bucket_size": 0}, 1, "parallel.bucket_size must be positive"),
    ]
    for overrides, world, message in cases:
        cfg = tiny_config(tmp_path, **overrides)
        if "num_heads" in str(overrides):
            cfg.parallel.tensor_model_parallel_size = 2
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(cfg, world)


def test_tensor_parallel_training_matches_single_rank(work):
    """TP=2 on 2 processes: the same losses and gradient norms (G's counted once over TP) as
    TP=1, step by step, in both stages."""
    single = run(tiny_config(work / "tp1"))["history"]
    split = run(tiny_config(work / "tp2", parallel__tensor_model_parallel_size=2), world_size=2)["history"]
    assert [h["phase"] for h in split] == [h["phase"] for h in single]
    for a, b in zip(single, split):
        for key in ("loss", "sc_loss", "rtd_loss", "mlm_loss", "grad_norm", "generator_grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def _measure_flops(rank, world_size, cfg):
    """FLOPs that torch counts in one hybrid and one SC-only optimizer step of the real engine."""
    from torch.utils.flop_counter import FlopCounterMode

    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training import loop

    from spactor_mega.training.engines import megatron as engine_module

    measured = {}
    original = engine_module.MegatronEngine.train_step

    def counted(self, micro_batches, phase):
        with FlopCounterMode(display=False) as counter:
            metrics = original(self, micro_batches, phase)
        measured.setdefault("hybrid" if phase is Phase.HYBRID else "sc", counter.get_total_flops())
        return metrics

    engine_module.MegatronEngine.train_step = counted
    try:
        result = loop.train(cfg)
    finally:
        engine_module.MegatronEngine.train_step = original
        destroy_parallel()
    return {"measured": measured, "model": result.history}


def test_flops_per_step_drop_to_the_sc_only_figure_at_tau(work):
    spactor = run_distributed(_measure_flops, 1, tiny_config(work / "flops"), timeout=600)[0]
    plain = run_distributed(_measure_flops, 1, tiny_config(work / "flops_t5", spactor__tau=0.0), timeout=600)[0]
    hybrid, sc = spactor["measured"]["hybrid"], spactor["measured"]["sc"]
    assert sc == plain["measured"]["sc"], "after tau a step costs exactly what plain T5 costs"
    assert hybrid > 1.1 * sc
    model = spactor["model"]
    modelled_ratio = model[0]["flops_per_step"] / model[-1]["flops_per_step"]
    assert hybrid / sc == pytest.approx(modelled_ratio, rel=0.1)
