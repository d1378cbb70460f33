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
gathers it on access while D's forward is active, and both engines fetch and prefetch it, each
able to wait on the other's all-gather (:class:`PairedInflightRegistry`). Megatron's TP layers
work unchanged: their groups come from ``megatron.core.parallel_state`` (passed as DeepSpeed's
``mpu``).

Tensor parallelism: D's engine gets Megatron's groups (ZeRO over DP, TP-split parameters counted
per shard in the grad norm, replicated ones once). G is not tensor-split: every TP rank holds a
copy and back-propagates only its own rows (:mod:`spactor_mega.parallel.row_shards`), so G's
engine treats all TP x DP ranks as data parallel (:func:`replica_mpu`, model-parallel size 1) and
G's gradients are multiplied by TP before ZeRO's mean over TP x DP: the sum over TP of the row
gradients, averaged over DP (what ``GeneratorDDP`` does for the Megatron engine). The RTD head
shares that engine unscaled: its gradients are the same on every TP rank, so the mean over
TP x DP is the mean over DP. Every element of G and the head sits in one ZeRO partition of that
group, so the grad norm counts them once, as Megatron's does.
The LR schedule is Megatron's ``OptimizerParamScheduler`` on both engines, as in the
Megatron engine, so the two engines follow the same learning-rate curve.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import math
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps

from spactor_mega.checkpoint.deepspeed import write_tp_layout
from spactor_mega.checkpoint.store import (
    CheckpointError,
    commit_checkpoint,
    prepare_checkpoint_dir,
    save_fault_point,
)
from spactor_mega.config import Config
from spactor_mega.curriculum import Phase
from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.parallel.cpu_compat import import_deepspeed
from spactor_mega.parallel.state import self_group
from spactor_mega.plan.engines.deepspeed import Adam, choose_adam, deepspeed_config
from spactor_mega.training.engines.base import eval_mode, torch_adafactor
from spactor_mega.training.engines.released import (
    ReleasedTensors,
    optimizer_state_tensors,
)
from spactor_mega.training.grad_agreement import autograd_gradient_cosine
from spactor_mega.training.lr_schedule import build_lr_scheduler
from spactor_mega.training.metrics import average_metrics
from spactor_mega.training.nonfinite import (
    NonFiniteStepsError,
    any_rank_nonfinite,
    inject_test_nan_gradients,
)

# deepspeed itself is imported where it is used, through import_deepspeed: it picks its
# accelerator once, at import, and on CPU that must be set first.

D_TAG, AUX_TAG = "discriminator", "generator_rtd"


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
    mpu = types.SimpleNamespace(**{k: getattr(ps, k) for k in dir(ps) if k.startswith("get_")})
    mpu.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    mpu.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    mpu.get_model_parallel_group = ps.get_tensor_model_parallel_group
    return mpu


def replica_mpu():
    """DeepSpeed's mpu for G's engine: every rank holding a copy of G (TP x DP) is data parallel
    and model parallelism is this rank alone (G's tensors are whole on every TP rank)."""
    replicas, alone = ps.get_tensor_and_data_parallel_group(), self_group()
    mpu = megatron_mpu()
    mpu.get_data_parallel_group = lambda *args, **kwargs: replicas
    mpu.get_data_parallel_world_size = lambda *args, **kwargs: torch.distributed.get_world_size(replicas)
    mpu.get_data_parallel_rank = lambda *args, **kwargs: torch.distributed.get_rank(replicas)
    for kind in ("model_parallel", "tensor_model_parallel"):
        setattr(mpu, f"get_{kind}_group", lambda *args, **kwargs: alone)
        setattr(mpu, f"get_{kind}_world_size", lambda *args, **kwargs: 1)
        setattr(mpu, f"get_{kind}_rank", lambda *args, **kwargs: 0)
    mpu.get_tensor_model_parallel_src_rank = lambda *args, **kwargs: torch.distributed.get_rank()
    return mpu


@contextlib.contextmanager
def _global_mpu(engine):
    """DeepSpeed keeps one process-global mpu (``deepspeed.utils.groups.mpu``, set by the last
    ``initialize``) and reads it in checkpoint save/load (which DP rank writes the model file);
    each of our engines has its own, so it is set around those calls."""
    groups = import_deepspeed().utils.groups
    saved, groups.mpu = groups.mpu, engine.mpu
    try:
        yield
    finally:
        groups.mpu = saved


def _scale_gradients(module: torch.nn.Module, factor: float) -> None:
    """Multiplies every gradient reaching ``module``'s parameters by ``factor`` (a tensor hook runs
    before the gradient is accumulated, so before ZeRO's reduction hooks see it)."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(lambda grad: grad * factor)


def _param_groups(module: torch.nn.Module) -> list[dict]:
    """Megatron's weight-decay rule (none on biases and 1-D tensors); ``wd_mult`` is what its
    scheduler reads when it sets each group's weight decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def fused_adam_prebuilt() -> bool:
    """Whether DeepSpeed's FusedAdam op was built at install time (``DS_BUILD_FUSED_ADAM=1``) for
    this accelerator and loads: the condition under which ``OpBuilder.load`` imports it instead of
    JIT-compiling it (``FusedAdamBuilder().is_compatible()`` says only that a build may work)."""
    deepspeed = import_deepspeed()
    installed = deepspeed.git_version_info
    if not (installed.installed_ops.get("fused_adam", False)
            and installed.accelerator_name == deepspeed.accelerator.get_accelerator()._name):
        return False
    try:
        deepspeed.ops.op_builder.FusedAdamBuilder().load(verbose=False)  # built for another torch/CUDA raises
    except (ImportError, RuntimeError):
        return False
    return True


def adam_for(cfg: Config) -> Adam:
    """:func:`~spactor_mega.plan.engines.deepspeed.choose_adam` for this machine."""
    offload = cfg.deepspeed.offload_optimizer != "none"
    cuda = torch.cuda.is_available()
    return choose_adam(
        offload, cuda,
        fused_adam_prebuilt=cuda and not offload and fused_adam_prebuilt(),
        cpu_adam_buildable=offload and import_deepspeed().ops.op_builder.CPUAdamBuilder().is_compatible(verbose=False),
    )


def describe_optimizer(engine) -> str:
    """The optimizer DeepSpeed built (the user JSON may have changed our choice)."""
    optimizer = engine.basic_optimizer
    fused = " (fused)" if getattr(optimizer, "defaults", {}).get("fused") else ""
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}{fused}"


class DeepSpeedEngine:
    """Steps D (and, until tau, G and the RTD head) through DeepSpeed ZeRO engines."""

    def __init__(self, cfg: Config, discriminator, generator, rtd_head, objective: SpactorObjective, bf16: bool):
        deepspeed = import_deepspeed()
        self.cfg = cfg
        self.objective = objective
        self.ds_config = deepspeed_config(cfg, ps.get_data_parallel_world_size(), bf16, adam_for(cfg),
                                          cuda=torch.cuda.is_available())
        tp = ps.get_tensor_model_parallel_world_size()

        def initialize(parts: Parts, mpu, config: dict):
            client = None  # AdamW: DeepSpeed's, from the config's optimizer section
            if cfg.optim.optimizer == "adafactor":  # ZeRO-0 only (validate), where DeepSpeed keeps tensors whole
                client = torch_adafactor(cfg, [p for p in parts.parameters() if p.requires_grad])
            engine, optimizer, _, _ = deepspeed.initialize(
                model=parts, model_parameters=_param_groups(parts), optimizer=client, config=config, mpu=mpu,
            )
            return engine, build_lr_scheduler(optimizer, cfg)

        d_parts = Parts(discriminator=discriminator)
        aux_parts = Parts(generator=generator, rtd_head=rtd_head) if generator is not None else None
        if aux_parts is not None and cfg.deepspeed.zero_stage == 3:
            PairedInflightRegistry.pair(d_parts, aux_parts)
        self.d, self.d_scheduler = initialize(d_parts, megatron_mpu(), self.ds_config)
        if torch.distributed.get_rank() == 0:  # DeepSpeed's own log_dist is silent below WARNING
            print(f"[train] DeepSpeed optimizer: {describe_optimizer(self.d)}", file=sys.stderr, flush=True)
        self.aux = self.aux_scheduler = None
        self.gradients = NonFiniteGradients()
        self.released = ReleasedTensors()
        if aux_parts is not None:
            # G's engine sees TP x DP data-parallel ranks, each with a micro-batch of its own.
            aux_config = {**self.ds_config, "train_batch_size": self.ds_config["train_batch_size"] * tp}
            self.aux, self.aux_scheduler = initialize(aux_parts, replica_mpu(), aux_config)
            if tp > 1:
                _scale_gradients(generator, float(tp))
            inject_test_nan_gradients(self.aux.module, lambda: self.d.global_steps + 1)  # before the watch sees them
            self.gradients.watch(self.aux.module)
            deepspeed.utils.groups.mpu = self.d.mpu  # DeepSpeed's process-global mpu: D's (see _global_mpu)
        self.gradients.watch(self.d.module)
        self.has_generator = self.aux is not None
        # ZeRO-0 has no torch-style backward hooks: G's gradients are all-reduced explicitly.
        self._aux_in_forward = cfg.deepspeed.zero_stage > 0

    def release_generator(self) -> None:
        """Drops G, the RTD head and their engine (parameters, gradients, optimizer state); what of
        them stays reachable is then counted by :meth:`parameter_counts` (it should be nothing)."""
        if self.aux is not None:
            self._track_released()
            self.aux.destroy()
            PairedInflightRegistry.unpair(self.d.module)
            _forget_zero3_engine(self.aux.module)
        self.aux = self.aux_scheduler = None
        self.has_generator = False
        self.released.collect()  # here, where no local holds a strong reference to them

    def _track_released(self) -> None:
        """Weak references to G's and the head's parameters, partitions and optimizer state."""
        for kind in ("generator", "rtd_head"):
            params = list(getattr(self.aux.module, kind).parameters())
            # ZeRO-3 leaves an empty tensor in each parameter; its partition is ds_tensor.
            self.released.track(kind, params + [getattr(p, "ds_tensor", None) for p in params])
        optimizer = _torch_optimizer(self.aux)
        partitions = [p for group in optimizer.param_groups for p in group["params"]]  # ZeRO's fp32 master partitions
        self.released.track("generator_optimizer_state", optimizer_state_tensors([optimizer]) + partitions)

    # One optimizer step -------------------------------------------------------------------
    def _micro_step(self, batch: dict, phase: Phase):
        """(loss, metrics) of one micro-batch, run inside the engines' forwards."""
        objective = self.objective

        def with_d(d):
            if phase is Phase.SC_ONLY:
                return objective(batch, d, phase=phase)

            def with_aux(g, rtd):
                return objective(batch, d, g, rtd, phase=phase)

            if self._aux_in_forward:
                return self.aux(with_aux)
            return with_aux(*self.aux.module.children())

        return self.d(with_d)

    def train_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        hybrid = phase is Phase.HYBRID
        engines = [self.d] + ([self.aux] if hybrid else [])
        outputs, nonfinite = [], False
        self.gradients.reset()
        for batch in micro_batches:
            loss, metrics = self._micro_step(batch, phase)
            outputs.append(metrics)
            last = len(outputs) == len(micro_batches)
            if last:
                result = average_metrics(outputs)  # the step's one read of the metrics
                # before the last backward, so no engine has stepped yet; the mean (float64) of the
                # micro-batches' losses is finite exactly when each of them is
                if any_rank_nonfinite([result["loss"]]):
                    nonfinite, loss = True, _overflowing(loss, engines)
            self.d.backward(loss)
            if hybrid and not self._aux_in_forward:
                self.aux.allreduce_gradients()
            # A finite loss can still give one engine non-finite gradients (G's alone, say): both
            # engines skip then, not only the one whose own overflow check would find them.
            if last and not nonfinite and any_rank_nonfinite([self.gradients.take()]):
                nonfinite = True
                _require_overflow_check(engines)
                for engine in engines:
                    _poison_gradients(engine)
            for engine in engines:
                engine.step()  # the optimizer steps at the accumulation boundary (the last micro-batch)
        # Each engine's overflow flag is agreed over its own ranks, so this is the same on every rank.
        skipped = not all(engine.was_step_applied() for engine in engines)
        if nonfinite and any(engine.was_step_applied() for engine in engines):
            raise NonFiniteStepsError("DeepSpeed applied a step whose loss or gradients are not finite (is "
                                      "bf16.check_grad_overflow off in deepspeed.config?); resume from the last "
                                      "checkpoint with it on")
        if not skipped:
            self.d_scheduler.step(increment=1)
            if hybrid:
                self.aux_scheduler.step(increment=1)
        result.update(grad_norm=_norm(self.d), lr=self.d.optimizer.param_groups[0]["lr"], skipped=float(skipped))
        if hybrid:
            result["generator_grad_norm"] = _norm(self.aux)
        return result

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        with eval_mode(e for e in (self.d, self.aux) if e is not None):
            return average_metrics([self._micro_step(b, phase)[1] for b in micro_batches])

    def gradient_cosine(self, micro_batch: dict) -> float:
        """By ``torch.autograd.grad`` on the engines' modules (:func:`~spactor_mega.training.grad_agreement
        .autograd_gradient_cosine`); NaN under ZeRO-3, whose parameters are partitioned outside the engine's forward."""
        if self.aux is None:
            raise RuntimeError("the gradient cosine needs the hybrid phase's modules (G was released at tau)")
        if self.cfg.deepspeed.zero_stage == 3:
            _say_no_cosine_under_zero3()
            return math.nan
        parts = self.aux.module
        return autograd_gradient_cosine(self.objective, micro_batch, self.d.module.discriminator, parts.generator,
                                        parts.rtd_head)

    # Checkpoints ----------------------------------------------------------------------------
    def save(self, save_dir: str | Path, step: int, record: dict, tokenizer_file: Optional[Path]) -> Path:
        """``SAVE_DIR/iter_NNNNNNN/{discriminator,generator_rtd}/`` (DeepSpeed's own sharded
        checkpoints, our LR schedulers in their client state, the TP layout that consolidation merges
        shards by) plus our run.json and ``latest``."""
        path = prepare_checkpoint_dir(save_dir, step)
        for i, (engine, scheduler, tag) in enumerate(self._engines()):
            if i:
                save_fault_point("between_shards", step)
            with _global_mpu(engine):
                engine.save_checkpoint(str(path), tag=tag, client_state={"lr_scheduler": scheduler.state_dict()},
                                       save_latest=False)
            tp = engine.mpu.get_model_parallel_world_size()
            if tp > 1 and torch.distributed.get_rank() == 0:
                write_tp_layout(path / tag, engine.module, tp)
        return commit_checkpoint(save_dir, path, record, tokenizer_file)

    def complete_saves(self, wait: bool) -> None:
        """Nothing to do: DeepSpeed's checkpoints are written synchronously (``train.async_save`` is
        refused for this engine)."""

    def load(self, path: Path) -> None:
        for engine, scheduler, tag in self._engines():
            if not (path / tag).is_dir():
                raise CheckpointError(f"{path}: no {tag}/ DeepSpeed checkpoint in it; resume a checkpoint that "
                                      "train.engine=deepspeed wrote at a step of the same stage")
            with _global_mpu(engine):
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

        if self.aux is None:  # released: what of it is still alive
            return {"discriminator": numel(self.d, "discriminator"), **{
                kind: self.released.alive(kind) for kind in ("generator", "rtd_head", "generator_optimizer_state")}}
        return {
            "discriminator": numel(self.d, "discriminator"),
            "generator": numel(self.aux, "generator"),
            "rtd_head": numel(self.aux, "rtd_head"),
            "generator_optimizer_state": sum(t.numel() for t in optimizer_state_tensors([_torch_optimizer(self.aux)])),
        }


class PairedInflightRegistry(collections.abc.MutableMapping):
    """One ZeRO-3 engine's registry of parameters in flight (all-gathers started, not yet waited
    on) that can also wait on its partner engine's.

    G's engine reads D's embedding, which ZeRO-3 then registers as an external parameter of G's
    module, so both engines' coordinators fetch it. With prefetch on, one coordinator may find it
    in flight under the other's all-gather, and a coordinator waits only on handles in its own
    registry (``assert ds_status == AVAILABLE`` in ``PartitionedParameterCoordinator
    .fetch_sub_module``). DeepSpeed 0.19.8 offers no way for two engines to share a parameter under
    prefetch; it does take a module's ``ds_inflight_param_registry`` when one is set
    (``DeepSpeedZeRoOffload.__init__``). Each engine gets one of these: it records and cleans up
    only its own all-gathers (a coordinator waits on and releases everything still in flight in
    its registry when its engine's forward starts: G's starts inside D's, and would drop D's
    prefetches), but finds and waits on its partner's too (``in``, ``pop``)."""

    def __init__(self, own):
        self.own = own  # DeepSpeed's InflightParamRegistry (its checks on adding a handle)
        self.partner: Optional["PairedInflightRegistry"] = None

    @classmethod
    def pair(cls, a: torch.nn.Module, b: torch.nn.Module) -> None:
        """Gives modules ``a`` and ``b`` (before their ``deepspeed.initialize``) paired registries."""
        registry = import_deepspeed().runtime.zero.partitioned_param_coordinator.InflightParamRegistry
        ra, rb = cls(registry()), cls(registry())
        ra.partner, rb.partner = rb, ra
        a.ds_inflight_param_registry, b.ds_inflight_param_registry = ra, rb

    @staticmethod
    def unpair(module: torch.nn.Module) -> None:
        registry = getattr(module, "ds_inflight_param_registry", None)
        if isinstance(registry, PairedInflightRegistry):
            registry.partner = None

    def _holder(self, param):
        if param in self.own or self.partner is None or param not in self.partner.own:
            return self.own
        return self.partner.own

    def __contains__(self, param) -> bool:
        return param in self._holder(param)

    def pop(self, param, *default):
        return self._holder(param).pop(param, *default)

    def __setitem__(self, param, handle) -> None:
        self.own[param] = handle

    def __getitem__(self, param):
        return self.own[param]

    def __delitem__(self, param) -> None:
        del self.own[param]

    def __iter__(self):
        return iter(self.own)

    def __len__(self) -> int:
        return len(self.own)


def _forget_zero3_engine(module: torch.nn.Module) -> None:
    """Drops what DeepSpeed (0.19) keeps process-wide of a destroyed ZeRO-3 engine, which would
    keep its modules and parameters alive: its top module on ``parameter_offload.FWD_MODULE_STACK``
    (pushed at init, never popped), and the class-level, unbounded ``lru_cache`` of
    ``PartitionedParameterCoordinator.__params_to_release`` (keyed by coordinator and module; it
    is only a cache, so clearing it for every engine is safe)."""
    zero = import_deepspeed().runtime.zero
    stack = zero.parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    method = zero.partitioned_param_coordinator.PartitionedParameterCoordinator.__dict__.get(
        "_PartitionedParameterCoordinator__params_to_release")
    cells = [c.cell_contents for c in (getattr(method, "__closure__", None) or ())]
    for cached in [method, *cells]:
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


@functools.cache
def _say_no_cosine_under_zero3() -> None:
    """Once per process: why the gradient cosine is NaN."""
    if torch.distributed.get_rank() == 0:
        print("[train] gradient cosine not measured (NaN): deepspeed.zero_stage=3 partitions D's parameters, which "
              "torch.autograd.grad outside DeepSpeed's forward cannot read; use ZeRO 0-2 or the megatron engine",
              file=sys.stderr, flush=True)


def _overflowing(loss: torch.Tensor, engines: list) -> torch.Tensor:
    """``loss`` times NaN: DeepSpeed skips an update only when its optimizer wrapper finds a gradient
    overflow (the ``overflow`` flag its engine reads after each step: ZeRO-1/2/3 in fp32, ZeRO-0 to 3 in
    bf16 with ``bf16.check_grad_overflow``, DeepSpeed's default), so a step whose loss is not finite on some
    rank is made to overflow on every rank, in both engines (G's gradients may be finite when D's loss
    is not), and each skips it as it skips an overflow."""
    _require_overflow_check(engines)
    return loss * float("nan")


def _require_overflow_check(engines: list) -> None:
    """ZeRO-0 in fp32 steps a plain torch optimizer, which checks no overflow and so cannot be made to
    skip a step: the run stops before the update instead."""
    if not all(hasattr(engine.optimizer, "overflow") for engine in engines):
        raise NonFiniteStepsError(
            "a step's loss or gradients are not finite and DeepSpeed cannot skip it under deepspeed.zero_stage=0 "
            "in fp32 (its plain optimizer checks no overflow): stopped before applying it; resume from the last "
            "checkpoint with deepspeed.zero_stage >= 1 or train.precision=bf16")


@torch.no_grad()
def _poison_gradients(engine) -> None:
    """Sets every gradient ``engine``'s optimizer steps from to NaN, after the backward and before
    ``step()``, so that its overflow check skips the step on every rank. Each rank writes what it holds:
    BF16_Optimizer's fp32 accumulation (``_hp_grad``, which ``safe_set_full_grad`` would miss: it writes
    the bf16 staging gradient, read no more); through DeepSpeed's ``safe_set_local_grad``, its ZeRO-3
    partition (DeepSpeed 0.19.8's ``safe_set_full_grad`` cuts a partition past a small parameter's end
    where ZeRO-3 padded it); through ``safe_set_full_grad``, the plain ``.grad`` or this rank's ZeRO-1/2
    fragment of each parameter (offloaded ones too)."""
    utils = import_deepspeed().utils
    nan = float("nan")
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_hp_grad", None) is not None:
            p._hp_grad.fill_(nan)
        elif hasattr(p, "ds_id"):  # ZeRO-3: the parameter itself is empty outside forward
            utils.safe_set_local_grad(p, _nan_partition(p, engine.optimizer))
        else:
            utils.safe_set_full_grad(p, torch.full(p.shape, nan, dtype=torch.float32, device=p.device))
    optimizer = engine.optimizer
    if getattr(optimizer, "cpu_offload", False):
        # ZeRO-1/2 with offload decide from what they recorded while reducing, not from the gradients
        # now: an overflow flag (bf16) and each parameter's gradient norm (fp32; summed over ranks)
        optimizer.update_offload_overflow_tracker(torch.tensor(nan))
        for key, norm in optimizer.norm_for_param_grads.items():
            optimizer.norm_for_param_grads[key] = torch.full_like(norm, nan)


def _nan_partition(param, optimizer) -> torch.Tensor:
    """This rank's ZeRO-3 gradient partition of ``param`` made NaN, its padding past the parameter's
    end left 0: the reductions of later steps do not write the padding, so NaN there would stay."""
    group = getattr(param, "ds_process_group", optimizer.dp_process_group)
    size = param.ds_tensor.numel()
    values = torch.zeros(size, dtype=torch.float32)
    values[: max(0, min(size, param.ds_numel - torch.distributed.get_rank(group) * size))] = float("nan")
    return values


class NonFiniteGradients:
    """Whether a gradient reaching the watched parameters was not finite on this rank since the last
    :meth:`reset` or :meth:`take`: a tensor hook per parameter sees each micro-batch's local gradient before ZeRO
    reduces or partitions it (the one place every stage and offload setting shares). The flag stays
    on the device, so the hooks add no synchronisation. A sum over ranks of finite gradients that
    overflows (only near 3e38 in bf16 or fp32) is left to each engine's own overflow check."""

    def __init__(self):
        self.flag: Optional[torch.Tensor] = None

    def watch(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._see)

    def _see(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self.flag = bad if self.flag is None else self.flag | bad

    def reset(self) -> None:
        self.flag = None

    def take(self) -> float:
        """inf when a non-finite gradient was seen since the last reset, else 0.0; resets."""
        flag, self.flag = self.flag, None
        return math.inf if flag is not None and bool(flag) else 0.0


def _norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers."""
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
