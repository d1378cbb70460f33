"""The DeepSpeed engine's generated config and optimizer choice, for CPU and (forced by arguments) CUDA
machines: which Adam DeepSpeed builds, ZeRO-3 prefetch, pinned offload buffers."""

import itertools
from pathlib import Path

import pytest

from spactor_mega.parallel.testing import run_distributed
from spactor_mega.plan.engines.deepspeed import (
    DEEPSPEED_CPU_ADAM,
    DEEPSPEED_FUSED_ADAM,
    TORCH_ADAMW,
    TORCH_FUSED_ADAMW,
    choose_adam,
    deepspeed_config,
)
from tests.training.test_training import tiny_config


def _expected_adam(offload, cuda, fused_prebuilt, cpu_adam_buildable):
    if offload:
        return DEEPSPEED_CPU_ADAM if cpu_adam_buildable else TORCH_ADAMW
    if cuda:
        return DEEPSPEED_FUSED_ADAM if fused_prebuilt else TORCH_FUSED_ADAMW
    return TORCH_ADAMW


@pytest.mark.parametrize("offload,cuda,fused_prebuilt,cpu_adam_buildable", list(itertools.product((False, True), repeat=4)))
def test_deepspeed_fused_adam_is_chosen_only_where_its_op_is_prebuilt(offload, cuda, fused_prebuilt, cpu_adam_buildable):
    """On CUDA without a prebuilt FusedAdam, torch's fused AdamW (no nvcc, no JIT build); offloaded states
    keep DeepSpeed's CPU Adam where it builds; CPU without offload keeps torch's AdamW."""
    adam = choose_adam(offload, cuda, fused_prebuilt, cpu_adam_buildable)
    assert adam == _expected_adam(offload, cuda, fused_prebuilt, cpu_adam_buildable)


def _zero_config(tmp_path: Path, stage: int, cuda: bool, **fields) -> dict:
    cfg = tiny_config(tmp_path / "run", train__engine="deepspeed")
    cfg.deepspeed.zero_stage = stage
    for key, value in fields.items():
        setattr(cfg.deepspeed, key, value)
    return deepspeed_config(cfg, 2, bf16=False, adam=TORCH_ADAMW, cuda=cuda)


@pytest.mark.parametrize("cuda", (False, True))
def test_zero3_keeps_prefetch_and_pins_offload_buffers_exactly_on_cuda(tmp_path, cuda):
    """Read back by DeepSpeed's own config class: the prefetch bucket is DeepSpeed's default (> 0) and
    offload buffers are pinned only where a GPU copies from them."""
    from spactor_mega.parallel.cpu_compat import import_deepspeed

    zero_config = import_deepspeed().runtime.zero.config.DeepSpeedZeroConfig
    generated = _zero_config(tmp_path, 3, cuda, offload_optimizer="cpu", offload_param="cpu")["zero_optimization"]
    zero = zero_config(**generated)
    assert zero.prefetch_bucket_size == zero_config().prefetch_bucket_size > 0
    assert zero.offload_optimizer.pin_memory is cuda
    assert zero.offload_param.pin_memory is cuda
    zero2 = zero_config(**_zero_config(tmp_path, 2, cuda, offload_optimizer="cpu")["zero_optimization"])
    assert zero2.offload_optimizer.pin_memory is cuda


@pytest.mark.parametrize("adam", (TORCH_ADAMW, TORCH_FUSED_ADAMW, DEEPSPEED_FUSED_ADAM, DEEPSPEED_CPU_ADAM))
def test_optimizer_section_names_the_chosen_adam_with_the_configs_hyperparameters(tmp_path, adam):
    cfg = tiny_config(tmp_path / "run", train__engine="deepspeed")
    optimizer = deepspeed_config(cfg, 2, bf16=False, adam=adam, cuda=True)["optimizer"]
    o = cfg.optim
    assert optimizer == {"type": "AdamW", "params": {
        "lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps, "weight_decay": o.weight_decay,
        "torch_adam": adam.torch_adam, **({"fused": True} if adam.fused else {})}}


def test_a_user_json_asking_for_deepspeeds_adam_drops_torchs_fused_argument(tmp_path):
    (tmp_path / "ds_adam.json").write_text('{"optimizer": {"params": {"torch_adam": false}}}')
    cfg = tiny_config(tmp_path / "run", train__engine="deepspeed", deepspeed__config=str(tmp_path / "ds_adam.json"))
    params = deepspeed_config(cfg, 2, bf16=False, adam=TORCH_FUSED_ADAMW, cuda=True)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


def _three_steps(rank, world_size, work: str):
    """The parameters after three ZeRO-2 steps of a small model, with DeepSpeed building the optimizer
    from the CUDA branch's section (torch's fused AdamW; it runs on CPU tensors too) and from the CPU
    branch's, and the optimizer each built."""
    import torch

    from spactor_mega.parallel.cpu_compat import import_deepspeed
    from spactor_mega.training.engines.deepspeed import describe_optimizer

    deepspeed = import_deepspeed()
    cfg = tiny_config(Path(work) / "run", train__engine="deepspeed", train__global_batch_size=2,
                      train__micro_batch_size=2)
    cfg.deepspeed.zero_stage = 2
    cfg.optim.weight_decay = 0.1
    out = {}
    for adam in (TORCH_FUSED_ADAMW, TORCH_ADAMW):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        config = deepspeed_config(cfg, 1, bf16=False, adam=adam, cuda=False)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        for step in range(3):
            x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step))
            engine.backward(engine(x).square().mean())
            engine.step()
        out[adam.name] = ([p.detach().clone() for p in engine.module.parameters()], describe_optimizer(engine))
    return out


def test_torch_fused_adamw_section_builds_a_fused_adamw_with_the_same_updates(tmp_path):
    import torch

    out = run_distributed(_three_steps, 1, str(tmp_path), timeout=300)[0]
    fused, fused_name = out[TORCH_FUSED_ADAMW.name]
    plain, plain_name = out[TORCH_ADAMW.name]
    assert (fused_name, plain_name) == ("torch.optim.adamw.AdamW (fused)", "torch.optim.adamw.AdamW")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(plain, _initial_parameters()))  # it did train


def _initial_parameters():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return [p.detach() for p in model.parameters()]
