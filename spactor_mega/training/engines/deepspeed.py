"""The DeepSpeed ZeRO engine: the same model, data, losses and stage schedule as the Megatron one.

Two DeepSpeed engines: one for D, one for the stage-1-only modules (generator G and the RTD
head, one optimizer over both). Each partitions its own parameters, gradients and optimizer
state over the data-parallel group (ZeRO 0-3, optimizer offload to CPU/NVMe, stage-3 parameter
offload), so releasing G's engine at tau frees G, the head and their optimizer state (offloaded
or not) and leaves D's partitions untouched. The checkpoint names of the two engines' modules
(``discriminator.``, ``generator.``, ``rtd_head.``) are the prefixes of a consolidated state dict.

A micro-batch runs the SpacTor objective inside both engines' forwards (D's outside, G's
inside), so each engine's ZeRO hooks see its parameters used, and one ``backward`` through D's
engine runs both engines' gradient reduction (DeepSpeed's torch-style backward hooks run G's
epilogue). G reads D's embedding (shared, registered in D only); under ZeRO-3 DeepSpeed
gathers it on access while D's forward is active. Megatron's TP layers work unchanged: their
groups come from ``megatron.core.parallel_state`` (passed as DeepSpeed's ``mpu``).
The LR schedule is Megatron's ``OptimizerParamScheduler`` on both engines, as in the
Megatron engine, so the two engines follow the same learning-rate curve.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Callable, Optional

import torch

from spactor_mega.config import Config
from spactor_mega.training.engines.megatron import _average

D_TAG, AUX_TAG = "discriminator", "generator_rtd"


def import_deepspeed():
    """deepspeed, with its CPU accelerator when there is no GPU (must be chosen before import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


class Parts(torch.nn.Module):
    """The modules one DeepSpeed engine owns, as named children (checkpoint key prefixes).
    ``forward(fn)`` calls ``fn(*children)``: the objective drives the modules itself (encode,
    decode, heads), and running it inside the engine's forward arms ZeRO's hooks."""

    def __init__(self, **parts: torch.nn.Module):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    def forward(self, fn: Callable):
        return fn(*self.children())


def megatron_mpu():
    """Megatron's ``parallel_state`` as DeepSpeed's model-parallel unit. DeepSpeed also calls
    ``get_model_parallel_rank/world_size``, which Megatron names by TP (PP is 1 here)."""
    from megatron.core import parallel_state as ps

    mpu = types.SimpleNamespace(**{k: getattr(ps, k) for k in dir(ps) if k.startswith("get_")})
    mpu.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    mpu.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    mpu.get_model_parallel_group = ps.get_tensor_model_parallel_group
    return mpu


def _param_groups(module: torch.nn.Module) -> list[dict]:
    """Megatron's weight-decay rule (none on biases and 1-D tensors); ``wd_mult`` is what its
    scheduler reads when it sets each group's weight decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def use_torch_adam(cfg: Config) -> bool:
    """DeepSpeed's CPU Adam for offloaded optimizer states (FusedAdam on GPU) where its op can be
    built; torch's AdamW otherwise (and on CPU without offload, where fused Adam buys nothing)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    if cfg.deepspeed.offload_optimizer != "none":
        return not CPUAdamBuilder().is_compatible(verbose=False)
    return not torch.cuda.is_available() or not FusedAdamBuilder().is_compatible(verbose=False)


class DeepSpeedEngine:
    """Steps D (and, until tau, G and the RTD head) through DeepSpeed ZeRO engines."""

    def __init__(self, cfg: Config, discriminator, generator, rtd_head, loss_fn: Callable, bf16: bool):
        import_deepspeed()
        import deepspeed
        from megatron.core import parallel_state as ps

        from spactor_mega.training.engines.deepspeed_config import deepspeed_config
        from spactor_mega.training.schedule import build_lr_scheduler

        self.cfg = cfg
        self.loss_fn = loss_fn
        self.ds_config = deepspeed_config(cfg, ps.get_data_parallel_world_size(), bf16, use_torch_adam(cfg))
        mpu = megatron_mpu()

        def initialize(parts: Parts):
            engine, optimizer, _, _ = deepspeed.initialize(
                model=parts, model_parameters=_param_groups(parts), config=self.ds_config, mpu=mpu,
            )
            return engine, build_lr_scheduler(optimizer, cfg)

        self.d, self.d_scheduler = initialize(Parts(discriminator=discriminator))
        self.aux = self.aux_scheduler = None
        if generator is not None:
            self.aux, self.aux_scheduler = initialize(Parts(generator=generator, rtd_head=rtd_head))
        self.has_generator = self.aux is not None
        # ZeRO-0 has no torch-style backward hooks: G's gradients are all-reduced explicitly.
        self._aux_in_forward = cfg.deepspeed.zero_stage > 0

    def release_generator(self) -> None:
        """Drops G, the RTD head and their engine (parameters, gradients, optimizer state)."""
        if self.aux is not None:
            self.aux.destroy()
        self.aux = self.aux_scheduler = None
        self.has_generator = False
        import gc

        gc.collect()

    # One optimizer step -------------------------------------------------------------------
    def _micro_step(self, batch: dict, hybrid: bool, step: int, micro_batch: int):
        """(loss, metrics) of one micro-batch, run inside the engines' forwards."""
        loss_fn = self.loss_fn

        def with_d(d):
            if not hybrid:
                return loss_fn(batch, d, None, None, hybrid=False, step=step, micro_batch=micro_batch)

            def with_aux(g, rtd):
                return loss_fn(batch, d, g, rtd, hybrid=True, step=step, micro_batch=micro_batch)

            if self._aux_in_forward:
                return self.aux(with_aux)
            return with_aux(*self.aux.module.children())

        return self.d(with_d)

    def train_step(self, micro_batches: list[dict], hybrid: bool, step: int) -> dict[str, float]:
        engines = [self.d] + ([self.aux] if hybrid else [])
        outputs = []
        for i, batch in enumerate(micro_batches):
            loss, metrics = self._micro_step(batch, hybrid, step, i)
            self.d.backward(loss)
            if hybrid and not self._aux_in_forward:
                self.aux.allreduce_gradients()
            for engine in engines:
                engine.step()  # the optimizer steps at the accumulation boundary (the last micro-batch)
            outputs.append(metrics)
        self.d_scheduler.step(increment=1)
        result = _average(outputs)
        result["grad_norm"] = _norm(self.d)
        result["lr"] = self.d.optimizer.param_groups[0]["lr"]
        if hybrid:
            self.aux_scheduler.step(increment=1)
            result["generator_grad_norm"] = _norm(self.aux)
        return result

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict], hybrid: bool, step: int) -> dict[str, float]:
        engines = [e for e in (self.d, self.aux) if e is not None]
        for engine in engines:
            engine.eval()
        try:
            return _average([self._micro_step(b, hybrid, step, i)[1] for i, b in enumerate(micro_batches)])
        finally:
            for engine in engines:
                engine.train()

    # Checkpoints ----------------------------------------------------------------------------
    def save(self, save_dir: str | Path, step: int, record: dict, tokenizer_file: Optional[Path]) -> Path:
        """``SAVE_DIR/iter_NNNNNNN/{discriminator,generator_rtd}/`` (DeepSpeed's own sharded
        checkpoints, our LR schedulers in their client state) plus our run.json and ``latest``."""
        from spactor_mega.checkpoint.megatron import commit_checkpoint, prepare_checkpoint_dir

        path = prepare_checkpoint_dir(save_dir, step)
        for engine, scheduler, tag in self._engines():
            engine.save_checkpoint(str(path), tag=tag, client_state={"lr_scheduler": scheduler.state_dict()},
                                   save_latest=False)
        commit_checkpoint(save_dir, path, record, tokenizer_file)
        return path

    def load(self, path: Path) -> None:
        from spactor_mega.checkpoint.megatron import CheckpointError

        for engine, scheduler, tag in self._engines():
            if not (path / tag).is_dir():
                raise CheckpointError(f"{path}: no {tag}/ DeepSpeed checkpoint in it; resume a checkpoint that "
                                      "train.engine=deepspeed wrote at a step of the same stage")
            _, client = engine.load_checkpoint(str(path), tag=tag, load_lr_scheduler_states=False)
            scheduler.load_state_dict(client["lr_scheduler"])

    def _engines(self) -> list:
        pairs = [(self.d, self.d_scheduler, D_TAG)]
        if self.aux is not None:
            pairs.append((self.aux, self.aux_scheduler, AUX_TAG))
        return pairs

    def parameter_counts(self) -> dict[str, int]:
        def numel(engine, name: str) -> int:
            module = getattr(engine.module, name) if engine is not None else None
            # ZeRO-3 leaves an empty tensor in each partitioned parameter; ds_numel is its size.
            return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()) if module is not None else 0

        return {
            "discriminator": numel(self.d, "discriminator"),
            "generator": numel(self.aux, "generator"),
            "rtd_head": numel(self.aux, "rtd_head"),
            "generator_optimizer_state": _optimizer_state_numel(self.aux),
        }


def _norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _optimizer_state_numel(engine) -> int:
    """Elements of the torch optimizer's state under DeepSpeed's wrappers (0 without an engine)."""
    if engine is None:
        return 0
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return sum(v.numel() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
