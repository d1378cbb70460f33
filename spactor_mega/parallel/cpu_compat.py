"""Makes Megatron-Core run on CPU (gloo) when CUDA is absent. One entry point: :func:`apply_cpu_compat`.

Megatron-Core assumes a GPU in three ways, and each is redirected here only inside the Megatron
modules that our path needs (model forward/backward, Megatron DDP, the Megatron optimizer with
torch AdamW, ``dist_checkpointing`` save/load, the pipeline schedules):

1. ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` / ``torch.cuda.empty_cache()``
   (about a hundred call sites: ``GlobalMemoryBuffer``, TP collectives, grad buffers, p2p, the
   checkpoint writers). The module-level name ``torch`` of each listed module is replaced by a
   thin proxy whose ``cuda`` attribute answers those three calls for the CPU and forwards
   everything else to the real ``torch`` (so ``torch.Tensor``, ``torch.distributed`` ... are the
   real objects; nothing outside those modules sees a change).
2. String literals: ``device="cuda"`` (schedules' token counter, optimizer scale tensors, grad-norm
   buffers, checkpoint validation tensors) and ``param.type() == "torch.cuda.FloatTensor"`` checks
   (FP16/BF16 optimizer, distributed optimizer, fp32 grad clipping). The constants of the listed
   modules' functions are rewritten in place: ``"cuda"`` -> ``"cpu"``,
   ``"torch.cuda.XTensor"`` -> ``"torch.XTensor"``. Every ``"cuda"`` literal in those modules is
   a device spec, or (0.19.2 ``filesystem_async``) a device-type test on a branch that CPU tensors
   never reach (checked on 0.16.1 and 0.19.2), so this changes only calls that would fail.
3. The CUDA RNG tracker of ``tensor_parallel.random`` (seeding, dropout forks, activation
   recompute) reads and writes ``torch.cuda`` RNG state, which on a CPU-only build silently does
   nothing (``_lazy_call`` queues forever) or raises. It is replaced by a tracker over the CPU
   generator with the same interface (``add``/``fork``/``get_states``/``set_states``).

Everything is a no-op when ``torch.cuda.is_available()``. :func:`apply_cpu_compat` is idempotent
and cheap; call it again after importing more Megatron modules (``initialize_parallel`` does).

Not covered (not needed by our path; they fail loudly rather than silently): overlap of grad
reduce/param gather (CUDA streams), ``HybridDeviceOptimizer`` (CPU offload, streams), CUDA graphs,
the fully-parallel *load* exchange (``.cuda()`` tensor methods in ``exchange_utils``), FSDP,
Transformer Engine, Apex. Megatron's own ``get_default_causal_mask`` is covered (it lives in
``transformer.utils``) but our model builds its masks itself anyway.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from typing import Any

import torch

# Megatron modules whose CUDA-only calls are redirected, each with why it is on the list.
# Missing modules (other Megatron versions) are skipped.
_PATCHED_MODULES: dict[str, str] = {
    "megatron.core.utils": "GlobalMemoryBuffer allocates on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "TP all-gather/reduce-scatter outputs on current_device()",
    "megatron.core.tensor_parallel.layers": "parameters and SP gather buffers on current_device()",
    "megatron.core.tensor_parallel.utils": "1-D split/gather buffers on current_device()",
    "megatron.core.tensor_parallel.cross_entropy": "vocab-parallel CE helpers (device of temporaries)",
    "megatron.core.transformer.utils": "get_default_causal_mask builds masks with device='cuda'",
    "megatron.core.transformer.module": "Float16Module / cudagraph static inputs on current_device()",
    "megatron.core.pipeline_parallel.schedules": "token counter torch.zeros(device='cuda'), autocast('cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "shape buffers on current_device(), synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "grad/param buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel": "synchronize()/empty_cache() around buffers",
    "megatron.core.distributed.finalize_model_grads": "token/loss reductions on current_device()",
    "megatron.core.optimizer": "optimizer construction helpers",
    "megatron.core.optimizer.optimizer": "scale tensors device='cuda'; 'torch.cuda.FloatTensor' checks",
    "megatron.core.optimizer.clip_grads": "grad-norm buffers device='cuda'; 'torch.cuda.FloatTensor' assert",
    "megatron.core.optimizer.distrib_optimizer": "'torch.cuda.*Tensor' checks; shard buffers on current_device()",
    "megatron.core.optimizer.grad_scaler": "loss-scale tensors device='cuda' (fp16 only)",
    "megatron.core.rerun_state_machine": "validation tensors device='cuda' used by the schedules",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() before writing",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save verification tensors device='cuda'",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness tensors on current_device()",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize() in save/load",
    "megatron.core.dist_checkpointing.strategies.torch": "placement strings / synchronize()",
    "megatron.core.dist_checkpointing.exchange_utils": "empty_like(device='cuda') for exchanged shards",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "torch.cuda.synchronize()",
}

# String constants rewritten inside the functions of the modules above.
_CONSTANTS: dict[str, str] = {
    "cuda": "cpu",
    "torch.cuda.FloatTensor": "torch.FloatTensor",
    "torch.cuda.HalfTensor": "torch.HalfTensor",
    "torch.cuda.BFloat16Tensor": "torch.BFloat16Tensor",
}

_PATCHED: set[str] = set()
_RNG_PATCHED = False
_ORIGINAL_TRACKER = None  # Megatron's CUDA tracker class, kept for tests


class _CudaOnCpu(types.ModuleType):
    """Stands in for ``torch.cuda`` inside the patched modules; forwards all but three calls."""

    def __init__(self) -> None:
        super().__init__("torch.cuda (spactor cpu_compat)")

    @staticmethod
    def current_device() -> str:  # used as `device=torch.cuda.current_device()`
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:  # CPU ops are synchronous
        return None

    @staticmethod
    def empty_cache() -> None:  # no caching allocator on CPU
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside the patched modules: real ``torch`` except ``.cuda``."""

    def __init__(self) -> None:
        super().__init__("torch (spactor cpu_compat)")
        self.__dict__["cuda"] = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()


def _rewrite_const(value: Any) -> Any:
    """The constant with "cuda" strings retargeted; the same object when nothing changes."""
    if isinstance(value, str):
        return _CONSTANTS.get(value, value)
    if isinstance(value, (tuple, frozenset)):  # `x in ['a', 'b']` compiles to a tuple constant
        items = [_rewrite_const(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items)
    if isinstance(value, types.CodeType):  # nested functions, comprehensions, lambdas
        return _rewrite_code(value)
    return value


def _rewrite_code(code: types.CodeType) -> types.CodeType:
    consts = tuple(_rewrite_const(c) for c in code.co_consts)
    if all(a is b for a, b in zip(consts, code.co_consts)):
        return code
    return code.replace(co_consts=consts)


def _patch_function(fn: Any) -> None:
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if isinstance(fn, types.FunctionType):
            new = _rewrite_code(fn.__code__)
            if new is not fn.__code__:
                fn.__code__ = new
        fn = getattr(fn, "__wrapped__", None)  # decorated (functools.wraps, torch.no_grad ...)


def _patch_class(cls: type, module_name: str) -> None:
    for attr in list(vars(cls).values()):
        if isinstance(attr, (staticmethod, classmethod)):
            _patch_function(attr.__func__)
        elif isinstance(attr, property):
            for f in (attr.fget, attr.fset, attr.fdel):
                _patch_function(f)
        elif isinstance(attr, types.FunctionType):
            _patch_function(attr)
        elif isinstance(attr, type) and attr.__module__ == module_name:
            _patch_class(attr, module_name)


def _patch_module(module: types.ModuleType) -> None:
    name = module.__name__
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_ON_CPU  # redirect torch.cuda.current_device()/synchronize()
    for obj in list(vars(module).values()):
        if getattr(obj, "__module__", None) != name:
            continue  # imported from elsewhere: patched (or not) where it is defined
        if isinstance(obj, type):
            _patch_class(obj, name)
        else:
            _patch_function(obj)


class _CpuRNGStatesTracker:
    """Megatron's RNG tracker over the CPU generator (mixed into Megatron's own class)."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_rng() -> None:
    global _RNG_PATCHED, _ORIGINAL_TRACKER
    if _RNG_PATCHED:
        return
    # Imported only on the CPU path: with CUDA this module patches nothing and needs no Megatron.
    from megatron.core.tensor_parallel import random as mrandom

    base = _ORIGINAL_TRACKER = mrandom.CudaRNGStatesTracker
    cpu_tracker = type("CpuRNGStatesTracker", (_CpuRNGStatesTracker, base), {})
    # initialize_rng_tracker() instantiates the class named CudaRNGStatesTracker in that module.
    mrandom.CudaRNGStatesTracker = cpu_tracker
    # Activation recompute saves/restores the "CUDA" RNG state with these two helpers.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # A tracker created before this point would be a CUDA one: start over with ours.
    if getattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None) is not None and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, cpu_tracker
    ):
        mrandom.initialize_rng_tracker(force_reset=True)
    _RNG_PATCHED = True


def cpu_compat_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Redirects Megatron-Core's CUDA-only calls to the CPU. Returns True when it is active.

    No-op (returns False) when CUDA is available. Idempotent; importing the listed modules is
    part of it, so that later imports by the caller find them patched.
    """
    if not cpu_compat_needed():
        return False
    for name in _PATCHED_MODULES:
        if name in _PATCHED:
            continue
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except Exception:  # absent in this Megatron version
                continue
        _patch_module(module)
        _PATCHED.add(name)
    _patch_rng()
    return True


def patched_modules() -> list[str]:
    """Names of the Megatron modules patched so far (for logging and tests)."""
    return sorted(_PATCHED)


def import_deepspeed():
    """``deepspeed``, with its CPU accelerator when CUDA is absent. DeepSpeed picks its accelerator
    once, at import, from ``DS_ACCELERATOR``: so every module imports it through here, late (not at
    module top), and CPU runs never probe for CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
