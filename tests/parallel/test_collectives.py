"""The collectives owner puts each tensor on the device of its group's backend.

No GPU is needed to see which device the code asks for: a group's backend is faked as NCCL, a
``TorchFunctionMode`` records every CUDA device the code requests (and hands it a CPU tensor
marked as "on the GPU"), and ``torch.distributed``'s collectives are replaced by a check that the
tensor they get is such a one, as NCCL requires. On 898cb1b the DP metric mean and the Megatron
engine's any-rank flag (``_any_rank``, now ``collectives.any_rank``) handed NCCL CPU tensors
(issue 19, items 1 and 2): both failed this check there.
"""

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.overrides import TorchFunctionMode

from spactor_mega.parallel import collectives
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.training.metrics import mean_over_data_parallel
from spactor_mega.training.nonfinite import any_rank_nonfinite
from spactor_mega.training.preemption import StopRequests

_GPU_MARK = "_asked_for_cuda"


def _is_cuda(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # a CUDA ordinal, as torch reads ``device=0``
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"


class AskedForCuda(TorchFunctionMode):
    """Records each CUDA device requested (``device=`` or ``Tensor.to(device)``); gives a CPU
    tensor instead, marked ``_asked_for_cuda``."""

    def __init__(self):
        super().__init__()
        self.requested = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        asked = False
        if _is_cuda(kwargs.get("device")):
            self.requested.append(torch.device("cuda", kwargs["device"]) if isinstance(kwargs["device"], int)
                                  else torch.device(kwargs["device"]))
            kwargs["device"], asked = "cpu", True
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
            self.requested += [torch.device(a) for a in args[1:] if _is_cuda(a)]
            args, asked = (args[0], *["cpu" if _is_cuda(a) else a for a in args[1:]]), True
        out = func(*args, **kwargs)
        if asked and func is torch.Tensor.to and out is args[0]:
            out = out.clone()  # a real move makes a new tensor; CPU to CPU would return the input
        if asked and isinstance(out, torch.Tensor):
            setattr(out, _GPU_MARK, True)
        return out


@pytest.fixture
def fake_nccl(monkeypatch):
    """A one-process Megatron setup whose groups claim to be NCCL groups of two ranks; each
    collective checks that its tensor was put on the GPU, and acts as if the other rank sent the same."""
    handed = []

    def nccl_collective(name):
        def collective(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            handed.append((name, [getattr(t, _GPU_MARK, False) for t in tensors]))
            assert all(getattr(t, _GPU_MARK, False) for t in tensors), (
                f"{name} handed a {tensors[0].device} tensor to an NCCL group")
        return collective

    with single_process_parallel():
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for name in ("all_reduce", "broadcast"):
            monkeypatch.setattr(dist, name, nccl_collective(name))
        with AskedForCuda() as mode:
            yield mode, handed


def test_group_device_follows_the_backend(monkeypatch):
    with single_process_parallel():
        assert collectives.group_device() == torch.device("cpu")  # the real gloo group
        for backend, device in [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                                ("cpu:gloo,cuda:nccl", torch.device("cpu"))]:
            monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
            assert collectives.group_device() == device, backend


def test_data_parallel_metric_mean_reduces_on_the_gpu(fake_nccl):
    """Item 1: every DP > 1 run reduced its metrics on the CPU over NCCL."""
    mode, handed = fake_nccl
    assert mean_over_data_parallel({"loss": 2.5, "sc_loss": 1.0}) == {"loss": 2.5 / 2, "sc_loss": 0.5}
    assert handed == [("all_reduce", [True])]
    assert [d.type for d in mode.requested] == ["cuda"]


@pytest.mark.parametrize("agree", [
    lambda: collectives.any_rank(True),  # item 2: the Megatron engine's any-rank flag (was megatron._any_rank)
    lambda: any_rank_nonfinite([1.0, math.nan]),
    lambda: StopRequests(None).agreed_stop() is None,
], ids=["any_rank", "nonfinite", "preemption"])
def test_world_flags_reduce_on_the_gpu(fake_nccl, agree):
    mode, handed = fake_nccl
    assert agree()
    assert handed == [("all_reduce", [True])]
    assert [d.type for d in mode.requested] == ["cuda"]


def test_in_place_reduce_returns_to_the_tensors_device(fake_nccl):
    """A CPU tensor reduced over NCCL travels to the GPU and its result comes back in place."""
    mode, handed = fake_nccl
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce_(t) is t and not hasattr(t, _GPU_MARK)
    assert handed == [("all_reduce", [True])]
