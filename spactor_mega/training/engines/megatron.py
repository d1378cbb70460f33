"""The Megatron-Core engine: DDP, optimizers, LR schedules, the forward/backward schedule.

D gets its own Megatron ``DistributedDataParallel`` and optimizer; the stage-1-only modules
(generator G and the RTD head) get theirs (one optimizer over both), so releasing them at
tau frees their parameters, gradients (DDP buffers) and optimizer state and leaves D's
buckets untouched. Micro-batches go through Megatron's ``get_forward_backward_func`` so
pipeline parallelism can plug into the same loop; both models' gradient syncs are deferred
to the last micro-batch through the schedule's ``no_sync_func``/``finalize_model_grads_func``.

With PP > 1 (:mod:`spactor_mega.training.pipeline_step`) this rank holds one stage of D; G only on
stage 0 and the RTD head only on the last stage. G runs inside D's schedule, in stage 0's
forward step of each micro-batch (its loss back-propagated by that micro-batch's backward); the
losses exist on the last stage (G's on stage 0) and are broadcast over the pipeline group for
logging. Stages in between hold neither G nor the head: they get Megatron's stub optimizer (no
parameters) in the G + RTD optimizer's place, as Megatron does for ranks without trainable
parameters, so every rank takes part in its collectives (the world-wide param-group alignment
when it is built, the grad-norm reduction over the model-parallel group when it steps) and it
clips by the same norm as with PP = 1.

With virtual pipeline stages (V > 1) this rank holds V chunks of D: one DDP per chunk, one
optimizer over all of them, and Megatron's interleaved schedule over the list. Each chunk's
checkpoint entries keep global names (``discriminator.encoder.layers.<global k>``), so a run
saved with V chunks resumes under any other layout.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
from pathlib import Path
from typing import Iterator

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding, extract_sharded_tensors_and_factories
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import (
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from spactor_mega.checkpoint.distributed_optimizer import SHARDING_TYPE, load_param_state, sharded_param_state
from spactor_mega.checkpoint.megatron import CheckpointWriter, load_checkpoint
from spactor_mega.checkpoint.store import CheckpointError, strip_prefix
from spactor_mega.config import Config
from spactor_mega.curriculum import Phase
from spactor_mega.model.generator import GeneratorDDP
from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.model.stages import allreduce_shared_grads, as_chunks, build_stage_chunks
from spactor_mega.parallel import collectives
from spactor_mega.plan.layout import config_layout, replans_at_tau
from spactor_mega.training.engines.base import adafactor_state_on, eval_mode, torch_adafactor
from spactor_mega.training.engines.released import (
    ReleasedTensors,
    optimizer_state_tensors,
)
from spactor_mega.training.grad_agreement import pipeline_gradient_cosine
from spactor_mega.training.lr_schedule import build_lr_scheduler
from spactor_mega.training.metrics import average_metrics, metrics_reducer
from spactor_mega.training.nonfinite import any_rank_nonfinite
from spactor_mega.training.pipeline_step import pipeline_step


def _ddp_config(cfg: Config, sharded: bool):
    """fp32 gradient buffers (reduced in fp32, what bf16 runs want too). ``sharded``: the
    distributed optimizer's layout, a reduce-scatter into per-DP-rank shards instead of an all-reduce
    and the parameters all-gathered after the step; both can overlap the backward / next forward
    (``parallel.overlap_*``)."""
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=sharded, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather and sharded, bucket_size=p.bucket_size,
    )


def _aux_ddp_config(cfg: Config):
    """G's and the RTD head's: never the distributed optimizer's layout. Megatron's distributed
    optimizer shards over its DP group, but G's replicas span TP x DP (each TP rank runs G on its
    own rows, :class:`GeneratorDDP`); and one checkpoint format for their optimizer under every
    layout keeps a checkpoint taken before tau resumable under any TP/PP/DP. They are about a tenth
    of D and leave at tau. Under TP > 1 G's gradients are scaled before their reduction, which an
    overlapped reduction started during the backward would precede: no overlap there."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False, bucket_size=cfg.parallel.bucket_size,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce and cfg.parallel.tensor_model_parallel_size == 1)


def _optimizer(cfg: Config, modules: list, bf16: bool, distributed: bool = False):
    """Megatron's optimizer for AdamW; Adafactor (which megatron-core lacks) from torch. In bf16 both
    are Megatron's mixed-precision optimizer: fp32 main params (the optimizer steps them, so its state
    is fp32 too), copied to the bf16 model after each step. Modules without trainable parameters give
    Megatron's stub optimizer."""
    o = cfg.optim
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=distributed,
    )
    if o.optimizer == "adamw":
        return get_megatron_optimizer(config, modules)
    # megatron-core builds only Adam/SGD; its wrappers take any torch optimizer and keep Megatron's
    # grad clipping, zero-grad and checkpoint interfaces. Float16OptimizerWithFloat16Params swaps fp32
    # copies of the bf16 params into Adafactor's param groups (FP32Optimizer would hand the bf16
    # params DDP's fp32 main_grad, which torch refuses). No init_state_fn: Adafactor's state is
    # saved whole (see _optimizer_state), so a load needs no template (Megatron passes None for SGD).
    # Both constructors have these positional parameters on megatron-core 0.16.1 and 0.19.2.
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    adafactor = torch_adafactor(cfg, params) if params else None
    if bf16:
        return Float16OptimizerWithFloat16Params(adafactor, config, None, None)  # no grad scaler in bf16
    return FP32Optimizer(adafactor, config, None)


class _NoParameters(torch.nn.Module):
    """What a pipeline stage without G and the RTD head gives the G + RTD optimizer (a stub)."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def _is_stub(optimizer) -> bool:
    return all(getattr(part, "is_stub_optimizer", False) for part in _optimizer_parts(optimizer))


def _optimizer_parts(optimizer) -> list:
    """The Megatron optimizers inside ``optimizer``: a ChainedOptimizer's parts, or itself."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


class MegatronEngine:
    """Steps D (and, until tau, G and the RTD head) through Megatron's schedule and optimizers."""

    def __init__(self, cfg: Config, discriminator, generator, rtd_head, objective: SpactorObjective, bf16: bool):
        self.cfg = cfg
        self.objective = objective
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.bf16 = bf16
        self.checkpoints = CheckpointWriter(cfg.train.async_save)
        self._wrap_discriminator(as_chunks(discriminator))
        aux_ddp = _aux_ddp_config(cfg)
        self.g = self.rtd = self.aux_optimizer = self.aux_scheduler = None
        self.released = ReleasedTensors()
        # Whether the run still has the hybrid stage's modules somewhere (on some stage with PP).
        self.has_generator = generator is not None or rtd_head is not None
        if self.pp > 1:
            self.has_generator = collectives.any_rank(self.has_generator)
        if generator is not None:
            self.g = GeneratorDDP(generator, aux_ddp)  # reduces over TP x DP (G's copies)
        if rtd_head is not None:
            self.rtd = DDP(rtd_head.config, aux_ddp, rtd_head)
        if self.has_generator:
            aux = [m for m in (self.g, self.rtd) if m is not None]
            if not aux:  # a middle pipeline stage
                aux = [DDP(self.d.config, aux_ddp, _NoParameters(self.d.config))]
            self.aux_optimizer = _optimizer(cfg, aux, bf16)
            self.aux_scheduler = build_lr_scheduler(self.aux_optimizer, cfg)
        self._install_schedule_hooks()

    def _wrap_discriminator(self, chunks: list) -> None:
        """D's DDP (one per chunk), optimizer and LR schedule; built again by a re-plan at tau."""
        d_ddp = _ddp_config(self.cfg, self.cfg.parallel.distributed_optimizer)
        self.d_chunks = [DDP(c.config, d_ddp, c) for c in chunks]
        self.d = self.d_chunks[0]  # the first chunk's config drives the schedule
        self.d_optimizer = _optimizer(self.cfg, self.d_chunks, self.bf16, d_ddp.use_distributed_optimizer)
        self.d_scheduler = build_lr_scheduler(self.d_optimizer, self.cfg)

    # Schedule plumbing ----------------------------------------------------------------
    def _models(self) -> list:
        return [*self.d_chunks, *(m for m in (self.g, self.rtd) if m is not None)]

    def _install_schedule_hooks(self) -> None:
        engine = self

        @contextlib.contextmanager
        def no_sync():
            with contextlib.ExitStack() as stack:
                for model in engine._models():
                    stack.enter_context(model.no_sync())
                yield

        def finalize(models, num_tokens=None, *args, **kwargs):
            for model in engine._models():
                finalize_model_grads([model], num_tokens)
            if engine.pp > 1:
                allreduce_shared_grads([c.module for c in engine.d_chunks])

        config = self.d.config
        config.no_sync_func = no_sync
        config.finalize_model_grads_func = finalize
        config.grad_sync_func = None

    def release_generator(self) -> None:
        """Drops G, the RTD head, their DDP buffers and optimizer state (tau reached); what of
        them stays reachable is then counted by :meth:`parameter_counts` (it should be nothing)."""
        self._track_released()
        self.g = self.rtd = self.aux_optimizer = self.aux_scheduler = None
        self.has_generator = False
        self.released.collect()  # here, where no local holds a strong reference to them
        self._replan_stages()

    def _replan_stages(self) -> None:
        """At tau (:func:`~spactor_mega.plan.layout.replans_at_tau`): D's stages rebuilt for the
        SC-only phase's FLOPs balance (the hybrid phase's gave stage 0 fewer layers, as it also ran
        G). Through a dist-checkpoint of D, its optimizer and LR schedule, which holds every tensor
        under its global name and shape, so it loads under the new split, as a resume does; written
        under ``train.save_dir`` (which every rank must see) and removed after. Collective."""
        if not replans_at_tau(self.cfg):
            return
        vocab = self.d_chunks[0].module.vocab_size
        split = config_layout(self.cfg, vocab, Phase.SC_ONLY).stage_split()
        rank = ps.get_pipeline_model_parallel_rank()
        held = [(_bounds(c.module.encoder_layers), _bounds(c.module.decoder_layers)) for c in self.d_chunks]
        planned = [split[chunk * self.pp + rank] for chunk in range(len(self.d_chunks))]
        if not collectives.any_rank(held != planned):
            return
        path = Path(self.cfg.train.save_dir) / ".replan-at-tau"
        first = torch.distributed.get_rank() == 0
        if first:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        collectives.barrier()
        self._gather_updated_params()
        self.checkpoints.complete(wait=True)  # Megatron's writers share one results queue: one save at a time
        dist_checkpointing.save(self.sharded_state_dict(), str(path))
        self.d_chunks = self.d = self.d_optimizer = self.d_scheduler = None  # the old stages go first
        gc.collect()
        chunks, _, _ = build_stage_chunks(self.cfg, vocab, split, with_generator=False,
                                          params_dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self._wrap_discriminator(chunks)
        self._install_schedule_hooks()
        self.load(path)
        collectives.barrier()
        if first:
            shutil.rmtree(path)

    def _track_released(self) -> None:
        """Weak references to G's and the head's parameters and optimizer state (with the fp32
        masters in bf16)."""
        model_params = set()
        for kind, model in (("generator", self.g), ("rtd_head", self.rtd)):
            if model is not None:
                params = list(model.module.parameters())
                model_params.update(id(p) for p in params)
                self.released.track(kind, params)
        optimizers = self._aux_torch_optimizers()
        main_params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]
                       if id(p) not in model_params]  # bf16: the optimizer's fp32 master copies
        self.released.track("generator_optimizer_state", optimizer_state_tensors(optimizers) + main_params)

    def _pipeline_step(self, micro_batches: list[dict], phase: Phase, forward_only: bool) -> dict:
        hybrid = phase is Phase.HYBRID
        return pipeline_step(
            self.objective, micro_batches, self.d_chunks, self.g if hybrid else None, self.rtd if hybrid else None,
            phase=phase, forward_only=forward_only, reduce_bias_grads=False,
        )

    # One optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        for model in self._models():
            model.zero_grad_buffer()
        for optimizer in (self.d_optimizer, self.aux_optimizer):
            if optimizer is not None:
                optimizer.zero_grad()
        metrics = self._run_schedule(micro_batches, phase, forward_only=False)
        # Megatron's step() skips only on fp16 loss scaling's overflow and applies the update as soon
        # as it has the norm: its halves let the loss and both norms be checked on every rank first
        # (training.nonfinite), so a non-finite step changes no weight, optimizer state or schedule.
        stepped = [(self.d_optimizer, self.d_scheduler)]
        if phase is Phase.HYBRID and self.aux_optimizer is not None:
            stepped.append((self.aux_optimizer, self.aux_scheduler))
        found_inf = any([optimizer.prepare_grads() for optimizer, _ in stepped])  # fp16 only: never in bf16/fp32
        norms = [float(optimizer.get_grad_norm()) for optimizer, _ in stepped]
        skipped = any_rank_nonfinite([metrics["loss"], *norms, math.inf if found_inf else 0.0])
        if not skipped:
            for (optimizer, scheduler), norm in zip(stepped, norms):
                _clip_and_step(optimizer, norm)
                scheduler.step(increment=1)
        metrics.update(grad_norm=norms[0], lr=self.d_optimizer.param_groups[0]["lr"], skipped=float(skipped))
        if len(norms) > 1:
            metrics["generator_grad_norm"] = norms[1]
        return metrics

    def gradient_cosine(self, micro_batch: dict) -> float:
        """Through Megatron's schedule (:func:`~spactor_mega.training.grad_agreement.pipeline_gradient_cosine`)."""
        if not self.has_generator:
            raise RuntimeError("the gradient cosine needs the hybrid phase's modules (G was released at tau)")
        self._gather_updated_params()  # on every rank: a DP collective with parallel.overlap_param_gather
        return pipeline_gradient_cosine(self.objective, micro_batch, self.d_chunks, self.g, self.rtd, self._models())

    def _gather_updated_params(self) -> None:
        """With ``parallel.overlap_param_gather`` the all-gather of the parameters the distributed
        optimizer just updated waits for the next training forward (Megatron's forward pre-hooks);
        an evaluation or a save before it would read the previous step's weights."""
        for model in self._models():
            if model.ddp_config.overlap_param_gather:
                model.start_param_sync(force_sync=True)

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        self._gather_updated_params()
        with eval_mode(self._models()):
            return self._run_schedule(micro_batches, phase, forward_only=True)

    def _run_schedule(self, micro_batches: list[dict], phase: Phase, forward_only: bool) -> dict[str, float]:
        """Forward (and backward) of all micro-batches; averaged metrics."""
        if self.pp > 1:
            return self._pipeline_step(micro_batches, phase, forward_only=forward_only)
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step(phase),
            data_iterator=iter(micro_batches),
            model=[self.d],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["enc_tokens"].shape[1],
            micro_batch_size=micro_batches[0]["enc_tokens"].shape[0],
            forward_only=forward_only,
        )
        return average_metrics(outputs)

    def _forward_step(self, phase: Phase):
        engine = self

        def forward_step(data_iterator: Iterator, model):
            batch = next(data_iterator)
            aux = (engine.g.module, engine.rtd.module) if phase is Phase.HYBRID else (None, None)
            loss, metrics = engine.objective(batch, model.module, *aux, phase=phase)
            return loss, metrics_reducer(metrics)

        return forward_step

    # Checkpoints --------------------------------------------------------------------------
    def save(self, save_dir, step: int, record: dict, tokenizer_file) -> Path:
        """A dist-checkpoint (:mod:`spactor_mega.checkpoint.megatron`) of everything below."""
        self._gather_updated_params()
        return self.checkpoints.save(save_dir, step, self.sharded_state_dict(), record, tokenizer_file)

    def complete_saves(self, wait: bool) -> None:
        self.checkpoints.complete(wait)

    def load(self, path) -> None:
        self.load_state_dict(load_checkpoint(path, self.sharded_state_dict(is_loading=True)))

    def _parts(self) -> list[tuple[str, str, object]]:
        """(state key, checkpoint prefix, module): D's chunks all under ``discriminator.`` (their
        keys are global names); only the state dict's nesting tells them apart."""
        chunks = [(f"discriminator_chunk{i}" if i else "discriminator", "discriminator.", c)
                  for i, c in enumerate(self.d_chunks)]
        aux = [(name, f"{name}.", m) for name, m in (("generator", self.g), ("rtd_head", self.rtd)) if m is not None]
        return chunks + aux

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        """Everything a checkpoint holds; ``is_loading`` builds the template to load into."""
        state = self._module_states()
        d_state, aux_state = _optimizer_model_states(state)
        state["d_optimizer"] = self._optimizer_state("d_optimizer", self.d_optimizer, d_state, is_loading)
        state["d_scheduler"] = self.d_scheduler.state_dict()
        if self.aux_optimizer is not None:
            state["aux_optimizer"] = self._optimizer_state("aux_optimizer", self.aux_optimizer, aux_state, is_loading)
            state["aux_scheduler"] = self.aux_scheduler.state_dict()
        return state

    def _optimizer_state(self, key: str, optimizer, model_state: dict, is_loading: bool):
        if self.cfg.optim.optimizer == "adamw":
            if is_loading:
                _give_fresh_adam_state(optimizer)
            if _is_stub(optimizer):
                return {}
            if any(_is_distributed(part) for part in _optimizer_parts(optimizer)):
                return _distributed_optimizer_state(optimizer, model_state)
            return optimizer.sharded_state_dict(model_state, is_loading=is_loading)
        # Adafactor's factored moments are not parameter-shaped, which Megatron's resharding
        # optimizer checkpoint requires: each parameter's state (and in bf16 its fp32 main copy) is
        # one object under the parameter's global name and offsets, so it moves between pipeline
        # stages and DP sizes (a resume under another split, the re-plan at tau); the factored
        # row/column moments of a TP shard are not those of another TP size, so TP stays.
        if _is_stub(optimizer):
            return {}
        stepped = _adafactor_params(optimizer)
        return {name: ShardedObject(f"{key}.adafactor.{name}",
                                    None if is_loading else _adafactor_entry(optimizer, param, stepped[param]),
                                    (1,), (0,), replica_id=replica)
                for name, (param, replica) in _global_names(model_state, stepped).items()}

    def _module_states(self) -> dict:
        """The modules' sharded state dicts, by state key (global tensor names)."""
        return {key: model.module.sharded_state_dict(prefix=prefix) for key, prefix, model in self._parts()}

    def load_state_dict(self, state: dict) -> None:
        for key, prefix, model in self._parts():
            model.module.load_state_dict(strip_prefix(state[key], prefix), strict=True)
        d_state, aux_state = _optimizer_model_states(self._module_states())
        self._load_optimizer(self.d_optimizer, state["d_optimizer"], d_state)
        self.d_scheduler.load_state_dict(state["d_scheduler"])
        if self.aux_optimizer is not None:
            self._load_optimizer(self.aux_optimizer, state["aux_optimizer"], aux_state)
            self.aux_scheduler.load_state_dict(state["aux_scheduler"])

    def _load_optimizer(self, optimizer, state: dict, model_state: dict) -> None:
        if _is_stub(optimizer):
            return
        if self.cfg.optim.optimizer == "adamw":
            parts = _optimizer_parts(optimizer)
            if not any(_is_distributed(part) for part in parts):
                optimizer.load_state_dict(state)
                return
            for part, part_state in zip(parts, [state] if len(parts) == 1 else [v for _, v in sorted(state.items())],
                                        strict=True):
                _load_distributed_optimizer(part, part_state, model_state)
            return
        # Adafactor, one entry per parameter (see _optimizer_state). Loaded by hand: Megatron's
        # load_state_dict matches param groups by keys of its own (wd_mult, lr_mult, ...) that
        # Adafactor's groups lack; the groups' hyperparameters come from the config and the LR
        # schedule's state.
        # A checkpoint of the other precision never gets here (checkpoint.store.check_resumable).
        stepped = _adafactor_params(optimizer)
        for name, (param, _) in _global_names(model_state, stepped).items():
            entry = state[name]
            main = stepped[param]
            optimizer.optimizer.state[main] = adafactor_state_on(entry["state"], main.device)
            if entry["main"] is not None:
                main.data.copy_(entry["main"])

    def _aux_torch_optimizers(self) -> list:
        """The torch optimizers inside the G + RTD head optimizer (none on stages without them)."""
        if self.aux_optimizer is None:
            return []
        return [part.optimizer for part in _optimizer_parts(self.aux_optimizer)
                if not getattr(part, "is_stub_optimizer", False)]

    def parameter_counts(self) -> dict[str, int]:
        """Elements per part on this rank; after :meth:`release_generator`, the elements of the
        released tensors that are still alive."""
        def live(model) -> int:
            return sum(p.numel() for p in model.module.parameters())

        counts = {"discriminator": sum(live(c) for c in self.d_chunks)}
        counts["generator"] = live(self.g) if self.g else self.released.alive("generator")
        counts["rtd_head"] = live(self.rtd) if self.rtd else self.released.alive("rtd_head")
        counts["generator_optimizer_state"] = (
            sum(t.numel() for t in optimizer_state_tensors(self._aux_torch_optimizers())) if self.aux_optimizer
            else self.released.alive("generator_optimizer_state"))
        return counts


def _optimizer_model_states(module_states: dict) -> tuple[dict, dict]:
    """(D's, G's + the RTD head's) sharded state dicts: what each optimizer's checkpoint refers to."""
    d_state = {k: v for k, v in module_states.items() if k.startswith("discriminator")}
    return d_state, {**module_states.get("generator", {}), **module_states.get("rtd_head", {})}


def _adafactor_params(optimizer) -> dict:
    """``{model parameter: the tensor Adafactor steps}``: the parameter itself in fp32, its fp32
    main copy under Megatron's bf16 wrapper."""
    if hasattr(optimizer, "fp32_from_float16_groups"):
        pairs = {model: main for models, mains in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups,
                                                      strict=True) for model, main in zip(models, mains, strict=True)}
        pairs.update((p, p) for group in optimizer.fp32_from_fp32_groups for p in group)
        return pairs
    return {p: p for group in optimizer.optimizer.param_groups for p in group["params"]}


def _global_names(model_state: dict, params: dict) -> dict:
    """``{name: (parameter, replica id)}`` for the parameters in ``params``: the name is the
    parameter's global checkpoint key and offsets (a stacked layer's offset is its global index,
    a TP shard's its position), the same under any pipeline split; the replica id is its
    ShardedTensor's, so a table held by several stages is written once."""
    tensors, _ = extract_sharded_tensors_and_factories(model_state)
    wanted = {id(p) for p in params}
    out = {}
    for sharded in nested_values(tensors):
        if id(sharded.data) in wanted:
            # a factory (Megatron's gated-MLP weight) names its place through the tensors it builds
            placed = sharded if hasattr(sharded, "global_offset") else next(iter(nested_values(sharded.build())))
            offsets = "_".join(map(str, placed.global_offset))
            out[f"{sharded.key}.{offsets}"] = (sharded.data, sharded.replica_id)
    if len(out) != len(wanted):  # a parameter without a checkpoint name would lose its state
        raise CheckpointError(f"{len(wanted) - len(out)} optimizer parameters have no tensor in the model's checkpoint")
    return out


def _adafactor_entry(optimizer, param, main) -> dict:
    """One parameter's Adafactor state and, in bf16, its fp32 main copy ``main`` (None in fp32)."""
    return {"state": dict(optimizer.optimizer.state.get(main, {})), "main": None if main is param else main}


def _clip_and_step(optimizer, grad_norm: float) -> None:
    """The rest of Megatron's ``step()`` after ``prepare_grads()`` and the norm: each part's
    gradients clipped by the total norm (as its ``ChainedOptimizer.step`` does), then the update."""
    for part in _optimizer_parts(optimizer):
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params and not getattr(part, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()


def _is_distributed(optimizer) -> bool:
    """A part of a chained optimizer that is Megatron's ``DistributedOptimizer``."""
    return not getattr(optimizer, "is_stub_optimizer", False) and hasattr(optimizer, "shard_fp32_groups")


def _distributed_optimizer_state(optimizer, model_state: dict) -> dict:
    """A chained optimizer's state with its distributed parts' per-parameter state written by each
    rank itself (:mod:`spactor_mega.checkpoint.distributed_optimizer`); nested and prefixed as
    Megatron's ``ChainedOptimizer.sharded_state_dict`` does with "fully_reshardable", whose
    checkpoints load into it."""
    parts = _optimizer_parts(optimizer)
    states = []
    for part in parts:
        state = part.state_dict()  # param groups and step; the same on every DP rank
        state["param_state"] = sharded_param_state(part, model_state)
        state["param_state_sharding_type"] = SHARDING_TYPE
        states.append(state)
    if len(parts) == 1:
        return states[0]
    for i, state in enumerate(states):
        add_prefix_for_sharding(state, f"chained_{i}.")
    return dict(enumerate(states))


def _load_distributed_optimizer(optimizer, state: dict, model_state: dict) -> None:
    """Megatron's ``DistributedOptimizer.load_state_dict`` for the param groups and step, then this
    rank's ranges of the main parameters and moments (:func:`load_param_state`). megatron-core
    0.16.1 (without Apex/TE) gives every parameter the *same* step tensor there, which torch's AdamW
    then increments in place once per parameter: each gets its own copy."""
    param_state = state.pop("param_state")
    del state["param_state_sharding_type"]  # ours, or "fully_reshardable" in checkpoints before it
    optimizer.load_state_dict(state)
    for entry in optimizer.optimizer.state.values():
        entry["step"] = entry["step"].clone()
    load_param_state(optimizer, param_state, model_state)


def _give_fresh_adam_state(optimizer) -> None:
    """Zero moments and step for every parameter a distributed optimizer has not stepped yet: the
    load template (:func:`_distributed_optimizer_state`) views the moments, and megatron-core's
    ``DistributedOptimizer.state_dict`` (0.16.1, without Apex/TE) reads torch AdamW's per-parameter
    ``step``, which a fresh torch optimizer creates only at its first step. The checkpoint
    overwrites all."""
    for part in _optimizer_parts(optimizer):
        if not _is_distributed(part):
            continue  # Megatron's template for its other optimizers needs nothing
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                state = part.optimizer.state[param]
                if not state:
                    state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param),
                                 step=torch.tensor(0.0))


def _bounds(layers) -> tuple[int, int]:
    """A chunk's ``[start, end)`` of one stack as the layout's ``stage_split`` writes it."""
    start, end = layers
    return (start, end) if end > start else (0, 0)

