"""The CPU compatibility layer: what it redirects, and that Megatron calls that fail without it work."""

import types

import pytest
import torch

from spactor_mega.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")


def test_apply_is_idempotent_and_lists_modules():
    assert cpu_compat.apply_cpu_compat() is True
    first = cpu_compat.patched_modules()
    assert cpu_compat.apply_cpu_compat() is True
    assert cpu_compat.patched_modules() == first
    for name in (
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
    ):
        assert name in first
    # Only the listed modules see the proxy; the real torch.cuda is untouched.
    import megatron.core.tensor_parallel.mappings as mappings

    assert mappings.torch is not torch and mappings.torch.cuda.current_device() == "cpu"
    assert mappings.torch.Tensor is torch.Tensor and mappings.torch.distributed is torch.distributed
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_megatron_cuda_rng_tracker_fails_on_cpu_and_ours_works():
    cpu_compat.apply_cpu_compat()
    from megatron.core.tensor_parallel import random as mrandom

    with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
        cpu_compat._ORIGINAL_TRACKER().add("model-parallel-rng", 5)

    tracker = mrandom.CudaRNGStatesTracker()  # what initialize_rng_tracker now instantiates
    tracker.add("model-parallel-rng", 5)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # outer stream untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    fresh = mrandom.CudaRNGStatesTracker()
    fresh.add("model-parallel-rng", 5)
    with fresh.fork():
        assert torch.equal(torch.rand(3), a)  # same seed, same stream


def test_hard_coded_cuda_devices_and_type_checks_are_redirected():
    cpu_compat.apply_cpu_compat()
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)  # torch.ones(..., device="cuda") inside
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)  # 'torch.cuda.FloatTensor' assert inside
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), rtol=1e-5)


def test_rewrite_mechanism_on_a_synthetic_module():
    src = '''
import torch
def make():
    t = torch.zeros(2, device="cuda")
    kind = t.type() in ["torch.cuda.FloatTensor", "torch.cuda.HalfTensor"]
    torch.cuda.synchronize()
    return t, kind, torch.empty(1, device=torch.cuda.current_device()).device.type
class Holder:
    @staticmethod
    def scale():
        return torch.tensor([1.0], device='cuda')
'''
    mod = types.ModuleType("fake_megatron_module")
    exec(compile(src, "fake_megatron_module", "exec"), mod.__dict__)
    for obj in (mod.make, mod.Holder.scale):
        obj.__module__ = mod.__name__
    mod.Holder.__module__ = mod.__name__
    with pytest.raises((AssertionError, RuntimeError)):
        mod.make()
    cpu_compat._patch_module(mod)
    t, kind, dev = mod.make()
    assert t.device.type == "cpu" and kind is True and dev == "cpu"
    assert mod.Holder.scale().device.type == "cpu"
