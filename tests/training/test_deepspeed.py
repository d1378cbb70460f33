"""The DeepSpeed ZeRO engine against the Megatron engine: same losses, exact resume, consolidation.

DeepSpeed starts slowly (and JIT-builds its shm comm op once per TORCH_EXTENSIONS_DIR), so the
multi-process checks share two 2-process launches (DP=2, TP=2) that train every configuration in turn.
"""

import json
from pathlib import Path

import pytest

from spactor_mega.config import ConfigError

from spactor_mega.plan.validate import validate
from spactor_mega.parallel.testing import run_distributed
from tests.training.test_training import tiny_config

STEPS, TAU, STOP = 10, 5, 3
ZERO_VARIANTS = {
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "zero1_offload": dict(zero_stage=1, offload_optimizer="cpu"),
    "zero2_offload": dict(zero_stage=2, offload_optimizer="cpu"),
    "zero3_offload": dict(zero_stage=3, offload_optimizer="cpu", offload_param="cpu"),
}


def _config(work: Path, name: str, zero: dict | None, **overrides):
    defaults = dict(train__steps=STEPS, spactor__tau=TAU, train__micro_batch_size=2, train__eval_interval=STEPS)
    cfg = tiny_config(work / name, **{**defaults, **overrides})
    if zero is not None:
        cfg.train.engine = "deepspeed"
        # torch's AdamW for offloaded states too: DeepSpeedCPUAdam's JIT build takes about a minute
        cfg.deepspeed.config = str(work / "torch_adam.json")
        for key, value in zero.items():
            setattr(cfg.deepspeed, key, value)
    return cfg


def _live_and_consolidated(engine, checkpoint: str):
    """The live engines' full (TP-gathered, ZeRO-gathered) state and D's logits, and on rank 0 the
    checkpoint's consolidated state and the logits of its Hugging Face export."""
    import deepspeed
    import torch

    from spactor_mega.checkpoint.deepspeed import consolidated_state_dict
    from spactor_mega.model.synthetic import synthetic_batch
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict, gather_tp_tensor

    batch = synthetic_batch(2, 32, 8, sp_size=500, seed=3, pad_rows=1, with_mlm=False)

    def logits(d):
        encoded = d.encode(batch["enc_tokens"], batch["enc_mask"])
        return d.lm_logits(d.decode(batch["dec_input"], encoded, batch["enc_mask"]))

    live_state = {}
    for ds_engine in (e for e in (engine.d, engine.aux) if e is not None):
        params = list(ds_engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=ds_engine.zero_optimization_partition_weights()):
            live_state.update(gather_full_state_dict(ds_engine.module))  # D's over TP; G is whole
    with torch.no_grad():
        engine.d.eval()
        live = gather_tp_tensor(engine.d(logits), dim=-1)  # vocab-parallel logits
    if torch.distributed.get_rank() != 0:
        return None
    return {"checkpoint": checkpoint, "live": live, "hf": _exported_hf_logits(checkpoint, batch),
            "live_state": live_state, "consolidated": consolidated_state_dict(checkpoint)}


def _exported_hf_logits(checkpoint: str, batch: dict):
    """Logits of ``spactor convert to-hf``'s export of the DeepSpeed checkpoint, loaded by transformers."""
    from transformers import T5ForConditionalGeneration

    from spactor_mega.convert.hf_export import export_to_hf

    folder = export_to_hf(checkpoint, Path(checkpoint).parent / "hf")
    model = T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    out = model(input_ids=batch["enc_tokens"], attention_mask=batch["enc_mask"].long(),
                decoder_input_ids=batch["dec_input"])
    return out.logits.transpose(0, 1).clone()  # [s, b, V] as ours


def _train_all(rank, world_size, work: str, runs: list, exported: tuple):
    """Trains ``runs`` in turn; the final checkpoints of the runs named in ``exported`` are
    consolidated and exported to HF against the live model (``out["exports"][name]``)."""
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training import loop

    work = Path(work)
    built = {}
    original = loop.build_engine  # the loop's name for it: wrapped to keep each run's engine

    def keep(*args, **kwargs):
        built["engine"] = original(*args, **kwargs)
        return built["engine"]

    loop.build_engine = keep
    out = {"exports": {}}
    try:
        for name, zero, overrides in runs:
            cfg = _config(work, name, zero, **overrides)
            try:
                result = loop.train(cfg)
                key = name + ("_resumed" if "train__resume" in overrides else "")
                out[key] = result.history
                out[key + "_evals"] = result.evals
                if key in exported:
                    out["exports"][key] = _live_and_consolidated(built["engine"], str(result.checkpoint))
            finally:
                built.clear()
                destroy_parallel(destroy_process_group=False)
    finally:
        loop.build_engine = original
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("deepspeed")
    # ZeRO-3 keeps every tensor partitioned (none persistent, as the large ones of a real model), so
    # each is fetched and prefetched, by D's engine and G's (D's embedding), at every step.
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}},
                                                      "zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    runs = [("megatron", None, {})] + [(name, zero, {}) for name, zero in ZERO_VARIANTS.items()]
    runs += [("stopped", ZERO_VARIANTS["zero3_offload"], {"train__exit_interval": STOP}),
             ("stopped", ZERO_VARIANTS["zero3_offload"], {"train__resume": "auto"})]
    return run_distributed(_train_all, 2, str(work), runs, ("zero3_offload",), timeout=900)[0]


TP_VARIANTS = ("zero2", "zero3")  # ZeRO-1 shares ZeRO-2's code path (stage_1_and_2)


@pytest.fixture(scope="module")
def trained_tp2(tmp_path_factory):
    """Megatron and DeepSpeed ZeRO-2/3 at TP=2 (DP=1), and a ZeRO-2 run stopped (before tau) and
    resumed; the ZeRO-2/3 and stopped checkpoints are consolidated and exported."""
    work = tmp_path_factory.mktemp("deepspeed_tp2")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    tp2 = {"parallel__tensor_model_parallel_size": 2, "train__global_batch_size": 4}
    runs = [("megatron", None, tp2)] + [(name, ZERO_VARIANTS[name], tp2) for name in TP_VARIANTS]
    runs += [("stopped", ZERO_VARIANTS["zero2"], {**tp2, "train__exit_interval": STOP}),
             ("stopped", ZERO_VARIANTS["zero2"], {**tp2, "train__resume": "auto"})]
    return run_distributed(_train_all, 2, str(work), runs, TP_VARIANTS + ("stopped",), timeout=900)


@pytest.mark.parametrize("name", list(ZERO_VARIANTS))
def test_zero_stages_follow_the_megatron_losses_across_tau(trained, name):
    reference, history = trained["megatron"], trained[name]
    assert [h["phase"] for h in history] == [1.0] * TAU + [2.0] * (STEPS - TAU)
    for a, b in zip(reference, history):
        for key in ("loss", "sc_loss", "rtd_loss", "mlm_loss", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, a["step"], key)
    evals, reference_evals = trained[name + "_evals"], trained["megatron_evals"]
    assert [e["step"] for e in evals] == [0, STEPS]
    for a, b in zip(reference_evals, evals):
        assert b.keys() == a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (name, "eval", a["step"], key)
    assert all(h["generator_params"] > 0 for h in history[:TAU])


@pytest.mark.parametrize("name", list(ZERO_VARIANTS))
def test_nothing_of_the_generator_is_counted_alive_after_tau(trained, name):
    history = trained[name]
    assert all(h["generator_params"] == 0 and h["generator_optimizer_state"] == 0 for h in history[TAU:])


@pytest.mark.parametrize("name", TP_VARIANTS)
def test_tensor_parallel_zero_stages_follow_the_megatron_losses_and_grad_norms(trained_tp2, name):
    """TP=2: G's row gradients are summed over TP (its engine is data parallel over TP x DP), the
    RTD head's are not, and both engines' grad norms count every element as Megatron's does."""
    for rank_result in trained_tp2:
        reference, history = rank_result["megatron"], rank_result[name]
        assert [h["phase"] for h in history] == [1.0] * TAU + [2.0] * (STEPS - TAU)
        for a, b in zip(reference, history):
            for key in ("loss", "sc_loss", "rtd_loss", "mlm_loss", "grad_norm", "generator_grad_norm"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, a["step"], key)
        for a, b in zip(rank_result["megatron_evals"], rank_result[name + "_evals"]):
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, "eval", a["step"], key)


def test_tensor_parallel_zero2_resume_is_bitwise_identical(trained_tp2):
    for rank_result in trained_tp2:
        full, resumed = rank_result["zero2"], rank_result["stopped"] + rank_result["stopped_resumed"]
        assert [h["step"] for h in resumed] == list(range(1, STEPS + 1))
        for a, b in zip(full, resumed):
            assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])


def test_zero3_offload_resume_is_bitwise_identical(trained):
    full, first, second = trained["zero3_offload"], trained["stopped"], trained["stopped_resumed"]
    assert [h["step"] for h in first] == list(range(1, STOP + 1))
    assert [h["step"] for h in first + second] == list(range(1, STEPS + 1))
    for a, b in zip(full, first + second):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])


def _assert_consolidates_and_exports(result, modules: set):
    """The consolidated checkpoint is the live model's full state, tensor for tensor, and its HF
    export gives the live logits (over the exported vocabulary rows)."""
    import torch

    state, live_state = result["consolidated"], result["live_state"]
    assert {k.split(".")[0] for k in state} == modules
    assert state.keys() == live_state.keys()
    for name, tensor in live_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    rows = result["hf"].shape[-1]
    torch.testing.assert_close(result["hf"], result["live"][..., :rows], rtol=1e-5, atol=1e-5)


def test_deepspeed_checkpoint_consolidates_and_exports_to_hf_with_the_live_logits(trained):
    _assert_consolidates_and_exports(trained["exports"]["zero3_offload"], {"discriminator"})  # saved after tau


@pytest.mark.parametrize("name", TP_VARIANTS + ("stopped",))
def test_tensor_parallel_checkpoint_consolidates_and_exports_to_hf_with_the_live_logits(trained_tp2, name):
    """TP=2: each TP rank's shards (ZeRO-2/3 fp32 partitions) merge by the layout recorded at save
    time (gated fc1 with stride 2, fused QKV/KV, vocab rows, relative-position heads); before tau
    (stopped) G and the RTD head, whole on every TP rank, come from their engine's files."""
    modules = {"discriminator", "generator", "rtd_head"} if name == "stopped" else {"discriminator"}
    _assert_consolidates_and_exports(trained_tp2[0]["exports"][name], modules)


def test_tensor_parallel_checkpoint_without_its_layout_or_a_rank_is_refused(trained_tp2, tmp_path):
    import shutil

    from spactor_mega.checkpoint.deepspeed import consolidated_state_dict
    from spactor_mega.checkpoint.store import CheckpointError

    for damage, message in ((lambda d: (d / "tensor_parallel.json").unlink(), r"tensor_parallel\.json: missing"),
                            (lambda d: (d / "mp_rank_01_model_states.pt").unlink(),
                             r"tensor_model_parallel_size=2 but the folder holds 1 TP ranks")):
        copy = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(trained_tp2[0]["exports"]["zero2"]["checkpoint"], copy)
        damage(copy / "discriminator")
        with pytest.raises(CheckpointError, match=message):
            consolidated_state_dict(copy)


def test_deepspeed_config_rejections_name_the_field(tmp_path):
    (tmp_path / "torch_adam.json").write_text("{}")

    def rejected(message, user=None, world=2, **fields):
        cfg = _config(tmp_path, "reject", {"zero_stage": 2, **fields})
        if user is not None:
            (tmp_path / "user.json").write_text(json.dumps(user))
            cfg.deepspeed.config = str(tmp_path / "user.json")
        with pytest.raises(ConfigError, match=message):
            validate(cfg, world)

    rejected(r"train_micro_batch_size_per_gpu=4 conflicts with 2 set by train\.micro_batch_size",
             {"train_micro_batch_size_per_gpu": 4})
    rejected(r"gradient_clipping=0\.5 conflicts with 1\.0 set by optim\.clip_grad", {"gradient_clipping": 0.5})
    rejected(r"optimizer\.params\.lr=0\.1 conflicts .* set by optim\.lr", {"optimizer": {"params": {"lr": 0.1}}})
    rejected(r"zero_optimization\.stage=3 conflicts with 2 set by deepspeed\.zero_stage", {"zero_optimization": {"stage": 3}})
    rejected(r"remove 'scheduler': the LR schedule comes from optim\.lr_schedule", {"scheduler": {"type": "WarmupLR"}})
    rejected(r"deepspeed\.offload_param needs deepspeed\.zero_stage 3", offload_param="cpu")
    rejected(r"deepspeed\.nvme_path is required for nvme offload", offload_optimizer="nvme")
    rejected(r"deepspeed\.config: .*missing\.json not found", config=str(tmp_path / "missing.json"))
    cfg = _config(tmp_path, "tp", {"zero_stage": 2}, parallel__tensor_model_parallel_size=2, train__micro_batch_size=1)
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=1 must be >= parallel\.tensor_model_parallel_size=2"):
        validate(cfg, 2)
    cfg = _config(tmp_path, "pp", {"zero_stage": 1})
    cfg.parallel.pipeline_model_parallel_size = 2
    with pytest.raises(ConfigError, match=r"train\.engine=deepspeed .*DeepSpeed forbids ZeRO-2/3 with pipelines"):
        validate(cfg, 2)
    # A consistent user JSON (same values, extra fields) is accepted.
    (tmp_path / "ok.json").write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"overlap_comm": False}}))
    cfg = _config(tmp_path, "ok", {"zero_stage": 2})
    cfg.deepspeed.config = str(tmp_path / "ok.json")
    validate(cfg, 2)


def test_paired_inflight_registries_wait_on_each_other_and_clean_up_only_their_own():
    """Either ZeRO-3 coordinator finds and takes the other's all-gather of a shared parameter (D's
    embedding), while the clean-up at the start of an engine's forward (its whole registry) leaves
    the other engine's prefetches in flight."""
    import torch

    from spactor_mega.parallel.cpu_compat import import_deepspeed
    from spactor_mega.training.engines.deepspeed import PairedInflightRegistry

    status = import_deepspeed().runtime.zero.partition_parameters.ZeroParamStatus
    d, g = torch.nn.Module(), torch.nn.Module()
    PairedInflightRegistry.pair(d, g)
    ours, theirs = d.ds_inflight_param_registry, g.ds_inflight_param_registry
    embedding, layer = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    for p in (embedding, layer):
        p.ds_status = status.INFLIGHT
    ours[embedding], theirs[layer] = "d's handle", "g's handle"
    assert embedding in theirs and layer in ours
    assert theirs.pop(embedding) == "d's handle" and embedding not in ours
    ours[embedding] = "d's handle"
    theirs.clear()  # G's forward starts
    assert list(ours.items()) == [(embedding, "d's handle")] and len(theirs) == 0
    PairedInflightRegistry.unpair(d)  # G released at tau
    theirs[layer] = "g's handle"
    assert layer not in ours
