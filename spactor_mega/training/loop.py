"""The training loop: data -> (phase-aware) batches -> engine step -> logs and checkpoints.

Readable top to bottom, in the manner of nanoT5: everything engine-specific (DDP,
optimizers, schedules, sharded state) lives behind the engine (:class:`Engine`); everything
data-specific behind the dataset and the batch builder. The step index decides the phase; from
tau on the generator and its optimizer are released and batches stop carrying MLM fields.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from spactor_mega.checkpoint.megatron import load_model_weights
from spactor_mega.checkpoint.store import (
    check_resumable,
    check_save_dir,
    find_checkpoint,
    make_record,
    read_record,
    recorded_skipped_steps,
)
from spactor_mega.config import Config
from spactor_mega.curriculum import AutoTau, Phase, describe_tau, phase_at
from spactor_mega.data.dataset import (
    PretrainingSampler,
    SpactorBatchBuilder,
    build_datasets,
    build_eval_dataset,
    collate_raw,
)
from spactor_mega.data.loader import MicroBatchDataset, micro_batch_loader
from spactor_mega.data.host_side import with_host_side
from spactor_mega.data.prepare import ensure_data
from spactor_mega.data.span_corruption import SpanCorruption
from spactor_mega.data.validation import check_passes
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.model.stages import as_chunks, build_spactor_modules
from spactor_mega.model.t5 import model_vocab_size
from spactor_mega.parallel import collectives
from spactor_mega.parallel.state import initialize_parallel
from spactor_mega.plan.derived import generator_num_layers, uses_bf16
from spactor_mega.plan.flops import format_flops, gradient_cosine_flops, sample_flops
from spactor_mega.plan.layout import config_layout
from spactor_mega.plan.memory import checkpoint_bytes
from spactor_mega.plan.mfu import device_peak_tflops, mfu
from spactor_mega.plan.validate import validate
from spactor_mega.training.engines import Engine, build_engine
from spactor_mega.training.metrics import RunLogger, mean_over_data_parallel
from spactor_mega.training.nonfinite import SkippedSteps, inject_test_nan
from spactor_mega.training.numerics import set_float_numerics
from spactor_mega.training.preemption import StopRequests, inject_test_fault
from spactor_mega.training.tau_signals import hybrid_signals
from spactor_mega.training.watchdog import HangWatchdog, point_flight_recorder_dump


@dataclass
class RunResult:
    step: int
    checkpoint: Optional[Path]
    tensorboard_dir: str
    history: list[dict] = field(default_factory=list)  # per-step metrics (rank 0)
    evals: list[dict] = field(default_factory=list)


def train(cfg: Config) -> RunResult:
    """Trains ``cfg`` on this process's rank of the launch (torchrun's environment; one process
    without it). The config is validated here, once, before any process group exists."""
    p, t = cfg.parallel, cfg.train
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    set_float_numerics(torch.cuda.is_available(), t.allow_tf32)
    point_flight_recorder_dump(t.save_dir, torch.cuda.is_available())
    # From here on SIGTERM/SIGUSR1/SIGINT (and train.exit_duration_minutes) stop the run after a step, saved
    stop_requests = StopRequests(t.exit_duration_minutes)
    initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, t.seed,
                        vp=p.virtual_pipeline_model_parallel_size, timeout_s=t.distributed_timeout_minutes * 60)
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    # Data -----------------------------------------------------------------------------
    if rank == 0:
        ensure_data(cfg)
    collectives.barrier()
    tokenizer = T5SentencePieceTokenizer(cfg.data.tokenizer)
    corruption = SpanCorruption(
        cfg.data.encoder_seq_length, tokenizer.first_sentinel_id, tokenizer.num_sentinels,
        cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length,
    )
    builder = SpactorBatchBuilder(corruption, tokenizer.sp_size, cfg.spactor.mlm_fraction)
    eval_samples = max(t.eval_batches * t.micro_batch_size * dp_size, 1)
    if cfg.spactor.tau == "auto":  # its measurements read a layout-free number of held-out samples
        eval_samples = max(eval_samples, auto_tau_samples(t))
    train_set, valid_set = build_datasets(
        cfg.data.train_data, cfg.data.valid_data, cfg.data.split, corruption, t.seed,
        t.steps * t.global_batch_size, eval_samples, cfg.data.cache_dir,
    )
    check_passes(train_set, cfg.data.max_epochs)
    extra_eval_sets = {Path(prefix).name: build_eval_dataset(prefix, corruption, t.seed, eval_samples, cfg.data.cache_dir)
                       for prefix in cfg.data.eval_data}

    # Model and engine -------------------------------------------------------------------
    vocab = model_vocab_size(cfg.model, tokenizer.model_vocab_size, p.tensor_model_parallel_size)
    check_save_dir(t.save_dir, checkpoint_bytes(cfg, vocab))  # before anything is built
    checkpoint = find_checkpoint(t.resume, t.save_dir)
    record = read_record(checkpoint) if checkpoint else {"step": 0, "consumed_samples": 0}
    # tau: the config's, or with tau auto its bound until the run's signals decide (state restored on resume)
    auto = AutoTau.from_config(cfg.spactor.auto_tau, record.get("auto_tau")) if cfg.spactor.tau == "auto" else None

    def tau() -> float:
        return auto.tau if auto else float(cfg.spactor.tau)

    # this rank builds its stage of it (all of D when PP = 1); balanced for the phase the run starts in
    layout = config_layout(cfg, vocab, phase_at(int(record["step"]), tau()))
    if checkpoint is not None:
        check_resumable(checkpoint, record, cfg, vocab, layout.describe())
    step, consumed = int(record["step"]), int(record["consumed_samples"])
    bf16 = uses_bf16(cfg)
    engine = _build_engine(cfg, vocab, layout, tokenizer, bf16, step, checkpoint, record, tau())

    flops = sample_flops(cfg, corruption.encoder_length, corruption.decoder_length, vocab, builder.mlm_capacity)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak_tflops = device_peak_tflops(device, bf16, t.peak_tflops)
    log = RunLogger(cfg, t.steps, step, enabled=rank == 0, resumed=step > 0)  # resumed: the same W&B run
    counts = engine.parameter_counts()
    pipeline = ""
    if p.pipeline_model_parallel_size > 1:
        virtual = p.virtual_pipeline_model_parallel_size
        pipeline = f" (layout {layout.describe()}" + (f", {virtual} virtual stages per rank)" if virtual > 1 else ")")
    log.line(
        f"[train] world {world} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x DP {dp_size}"
        f"{pipeline}; "
        f"D {counts['discriminator'] / 1e6:.2f}M params per rank, G {generator_num_layers(cfg)} layers "
        f"{counts['generator'] / 1e6:.2f}M; {'bf16' if bf16 else 'fp32'}; tau={describe_tau(cfg.spactor, auto.decided if auto else None)}; "
        f"FLOPs/sample hybrid {format_flops(flops.hybrid)}, SC-only {format_flops(flops.sc_only)}; "
        + (f"MFU against a {peak_tflops:g} TFLOP/s peak per device" if peak_tflops
           else "MFU not reported (no known peak for this device: set train.peak_tflops)")
        + (f"; resumed from {checkpoint} at step {step}" if checkpoint else "")
    )

    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)

    def make_loader(consumed_samples: int):
        """Whole micro-batches from ``consumed_samples`` on (MLM fields iff their step is hybrid under
        the tau known now), built ahead by cfg.data.num_workers workers."""
        sampler = PretrainingSampler(t.steps * t.global_batch_size, consumed_samples, t.micro_batch_size, dp_rank,
                                     dp_size)
        return micro_batch_loader(MicroBatchDataset(train_set, builder, sampler, t.global_batch_size, tau()),
                                  cfg.data.num_workers, cfg.data.prefetch_factor)

    loader = make_loader(consumed)
    result = RunResult(step=step, checkpoint=checkpoint, tensorboard_dir=cfg.logging.tensorboard_dir)
    # non-finite steps, counted on from the checkpoint's counts
    skipped_steps = SkippedSteps(t.max_skipped_steps, *recorded_skipped_steps(record))
    # The latest evaluation ({"step", "valid": metrics, extra set: metrics}), kept in every checkpoint's
    # record from then on (the exported model card's final losses); carried over a resume
    validation = record.get("validation")

    def save(at_step: int) -> Path:
        written = make_record(cfg, at_step, vocab, tau(), pipeline_layout=layout.describe(), data_parallel_size=dp_size,
                              skipped_steps=skipped_steps.total, skipped_in_a_row=skipped_steps.in_a_row,
                              **({"auto_tau": auto.state()} if auto else {}),
                              **({"validation": validation} if validation else {}))
        return engine.save(t.save_dir, at_step, written, tokenizer.model_file)

    eval_multiple = p.pipeline_model_parallel_size if p.virtual_pipeline_model_parallel_size > 1 else 1

    def run_eval(at_step: int) -> None:
        """Validates the weights that enter step ``at_step``: the hybrid terms too while it is hybrid."""
        nonlocal validation
        evaluation = evaluate(engine, valid_set, builder, t, dp_rank, dp_size, phase_at(at_step, tau()),
                              eval_multiple)
        result.evals.append({"step": at_step, **evaluation})
        validation = {"step": at_step, "valid": evaluation}
        log.scalars(at_step, evaluation, prefix="valid")
        log.line(_format_eval("valid", at_step, evaluation))
        for name, dataset in extra_eval_sets.items():  # clean SC only: the quality measure
            extra = evaluate(engine, dataset, builder, t, dp_rank, dp_size, Phase.SC_ONLY, eval_multiple)
            validation[name] = extra
            log.scalars(at_step, extra, prefix=name)
            log.line(_format_eval(name, at_step, extra))

    if step == 0 and t.eval_interval > 0 and valid_set is not None:
        run_eval(0)

    last_time = time.perf_counter()
    measured_flops = 0.0  # a tau measurement's own training FLOPs (grad_cosine), added to the next step's
    watchdog = HangWatchdog(t.hang_factor, rank)
    while step < t.steps:
        phase = phase_at(step, tau())
        hybrid = phase is Phase.HYBRID
        if not hybrid and engine.has_generator:
            engine.release_generator()  # and, when the SC-only balance differs, the stages rebuilt to it
            layout = config_layout(cfg, vocab, phase)
            counts = engine.parameter_counts()
            log.line(f"[train] step {step}: tau reached, SC only from here; generator released "
                     f"(G params {counts['generator']}, G optimizer state {counts['generator_optimizer_state']})"
                     + (f"; pipeline layout {layout.describe()}" if p.pipeline_model_parallel_size > 1 else ""))
        watchdog.start_step(step + 1)
        wait_start = time.perf_counter()
        micro_batches = [on_device(next(loader)) for _ in range(accumulation)]
        data_wait = time.perf_counter() - wait_start  # time blocked on the input pipeline
        inject_test_fault(step + 1)
        inject_test_nan(step + 1, micro_batches, dp_rank)
        metrics = mean_over_data_parallel(engine.train_step(micro_batches, phase))
        step += 1
        engine.complete_saves(wait=False)  # publishes an asynchronous save once every rank has written it
        watchdog.end_step()

        now = time.perf_counter()
        seconds, last_time = now - last_time, now
        sample_cost = flops.hybrid if hybrid else flops.sc_only
        step_flops, measured_flops = sample_cost * t.global_batch_size + measured_flops, 0.0
        counts = engine.parameter_counts()
        metrics.update(
            phase=float(phase.value), step_time_s=seconds, data_wait_s=data_wait,
            generator_params=float(counts["generator"]),
            generator_optimizer_state=float(counts["generator_optimizer_state"]),
            tokens_per_s=t.global_batch_size * corruption.encoder_length / seconds,
            flops_per_step=step_flops,
            tflops_per_s_per_rank=step_flops / seconds / world / 1e12,
            **({"tau": tau()} if auto else {}),  # train/tau: the bound until the signals decide, then tau
        )
        if peak_tflops:
            metrics["mfu"] = mfu(step_flops, seconds, world, peak_tflops)
        skipped_steps.count(metrics["skipped"] > 0)
        metrics["skipped_steps"] = float(skipped_steps.total)
        result.history.append({"step": step, **metrics})
        log.scalars(step, metrics)
        log.advance(phase.name, metrics["loss"])
        if step % cfg.logging.log_interval == 0 or step == t.steps:
            log.line(_format(step, phase, metrics))
        if metrics["skipped"] > 0:
            log.line(f"[train] step {step} skipped: non-finite loss or gradient norm, nothing updated "
                     f"({skipped_steps.in_a_row} in a row, at most train.max_skipped_steps={t.max_skipped_steps})")
        if skipped_steps.exceeded:
            break  # raised below, once the saves started are complete
        if t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.steps) and valid_set is not None:
            run_eval(step)
        if auto is not None and auto.measures_at(step):
            value = measure_tau_signal(auto, engine, valid_set, builder, t, dp_rank, dp_size, eval_multiple)
            if auto.signal == "grad_cosine":  # two extra backward passes: counted with the next step
                measured_flops = gradient_cosine_flops(cfg, flops)
            log.scalars(step, {auto.metric: value}, prefix="auto_tau")
            if auto.observe(step, value):
                loader = make_loader(step * t.global_batch_size)  # later batches without MLM fields
                log.line(f"[train] step {step}: tau auto: {auto.metric} {value:.4g} past its threshold "
                         f"{auto.patience} measurement(s) in a row; tau = {step}, SC only from here")
        exiting = bool(t.exit_interval) and step % t.exit_interval == 0 and step < t.steps
        stopping = stop_requests.agreed_stop() if step < t.steps else None  # the same on every rank
        if (t.save_interval > 0 and step % t.save_interval == 0) or step == t.steps or exiting or stopping:
            result.checkpoint = save(step)
        if exiting:
            log.line(f"[train] exit interval reached at step {step}; resume with --train.resume auto")
            break
        if stopping:
            log.line(f"[train] {stopping}: stopped after step {step}, saved {result.checkpoint}; "
                     "resume with --train.resume auto")
            break

    watchdog.close()
    engine.complete_saves(wait=True)
    stop_requests.close()
    destinations = log.destinations()
    log.close()
    result.step = step
    if skipped_steps.exceeded:
        raise skipped_steps.error(step, result.checkpoint)
    if rank == 0:
        print(f"[train] done: checkpoint {result.checkpoint}; {destinations}", flush=True)
    return result


# What validation reports from the hybrid objective, under names of their own: the SC loss of D
# reading G-replaced inputs is not the curve a run is judged by (that is the clean ``sc_loss``).
HYBRID_EVAL_NAMES = {
    "loss": "hybrid_loss", "sc_loss": "sc_loss_replaced", "rtd_loss": "rtd_loss", "mlm_loss": "mlm_loss",
    "rtd_accuracy": "rtd_accuracy", "rtd_recall": "rtd_recall", "mlm_accuracy": "mlm_accuracy",
    "replaced_fraction": "replaced_fraction",
}


def evaluate(engine: Engine, valid_set, builder, t, dp_rank: int, dp_size: int, phase: Phase,
             multiple: int = 1, samples: Optional[int] = None) -> dict[str, float]:
    """Validation on the first ``eval_batches`` micro-batches per data-parallel rank of the held-out
    split (or its first ``samples`` samples), cut to a multiple of ``multiple`` (Megatron's
    interleaved schedule needs a multiple of PP).

    ``sc_loss`` is always D's SC loss on the clean (not replaced) inputs, so it is comparable
    before and after tau and with plain T5; in the hybrid phase the hybrid objective's terms follow
    under :data:`HYBRID_EVAL_NAMES` (on the same samples, with their MLM masks and G's replacements)."""
    samples = t.eval_batches * t.micro_batch_size * dp_size if samples is None else samples
    sampler = PretrainingSampler(min(len(valid_set), samples), 0, t.micro_batch_size, dp_rank, dp_size)
    hybrid = phase is Phase.HYBRID
    micro_batches = []
    for indices in sampler:
        raw = collate_raw([valid_set[i] for i in indices])
        micro_batches.append(on_device(builder(raw["raw"], raw["key"], with_mlm=hybrid)))
    micro_batches = micro_batches[: len(micro_batches) // multiple * multiple]
    if not micro_batches:
        return {}
    result = {}
    if hybrid:
        replaced = engine.eval_step(micro_batches, Phase.HYBRID)
        result.update({name: replaced[k] for k, name in HYBRID_EVAL_NAMES.items() if k in replaced})
    # The same batches: the SC-only objective reads their span-corruption fields, not the MLM ones.
    clean = engine.eval_step(micro_batches, Phase.SC_ONLY)
    evaluation = mean_over_data_parallel({**{k: clean[k] for k in ("sc_loss", "sc_accuracy", "z_loss") if k in clean},
                                          **result})
    return {**evaluation, **hybrid_signals(evaluation)}


def _build_engine(cfg: Config, vocab: int, layout, tokenizer, bf16: bool, step: int, checkpoint, record,
                  tau: float) -> Engine:
    """This rank's modules inside the engine, restored from ``checkpoint``. The modules are
    referenced by the engine only (not by the loop), so releasing G at tau frees it."""
    d, g, rtd = build_spactor_modules(
        cfg, vocab, with_generator=phase_at(step, tau) is Phase.HYBRID,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, stage_split=layout.stage_split(),
    )
    weights_only = checkpoint is not None and record.get("weights_only", False)
    if weights_only:  # an imported model: D's weights; G, the RTD head and optimizers start afresh
        for chunk in as_chunks(d):  # virtual stages: one load per chunk
            load_model_weights(checkpoint, chunk)
    # Sentinels, the mask token and padded rows (ids >= sp_size) are never sampled; nor pad/EOS.
    objective = SpactorObjective.from_config(cfg, mask_id=tokenizer.mask_id, sample_vocab_size=tokenizer.sp_size)
    engine = build_engine(cfg, d, g, rtd, objective, bf16)
    if checkpoint is not None and not weights_only:
        engine.load(checkpoint)
    return engine


def auto_tau_samples(t) -> int:
    """Held-out samples a tau-auto measurement reads: ``eval_batches`` global batches' worth, the same
    number under any layout (a validation reads ``eval_batches`` micro-batches per DP rank)."""
    return t.eval_batches * t.global_batch_size


def measure_tau_signal(auto: AutoTau, engine: Engine, valid_set, builder, t, dp_rank: int, dp_size: int,
                       multiple: int) -> float:
    """The value of ``auto``'s signal for the weights entering this step, the same on every rank,
    agreed by one collective: a hybrid validation's metric on :func:`auto_tau_samples` held-out
    samples (the samples, and their grouping into micro-batches, do not depend on the layout), or
    the gradient cosine on the validation split's first micro-batch, the same on every rank
    (:mod:`spactor_mega.training.grad_agreement`)."""
    if valid_set is None:
        raise RuntimeError("spactor.tau auto measures on the validation split; the run has none")
    if auto.signal == "grad_cosine":
        raw = collate_raw([valid_set[i] for i in range(t.micro_batch_size)])
        value = engine.gradient_cosine(on_device(builder(raw["raw"], raw["key"], with_mlm=True)))
    else:
        value = evaluate(engine, valid_set, builder, t, dp_rank, dp_size, Phase.HYBRID, multiple,
                         samples=auto_tau_samples(t))[auto.metric]
    return collectives.max_over_ranks([float(value)])[0]


def on_device(batch: dict) -> dict:
    """A micro-batch on this rank's GPU (the input pipeline builds it on the CPU), with the facts
    the model needs as Python values taken from its CPU tensors first (:mod:`~spactor_mega.data.host_side`:
    read there, they cost no device sync); without CUDA the tensors stay where they are."""
    batch = with_host_side(batch)
    if not torch.cuda.is_available():
        return batch
    device = torch.cuda.current_device()
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _format_eval(split: str, step: int, evaluation: dict[str, float]) -> str:
    return f"[{split}] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in evaluation.items())


def _format(step: int, phase: Phase, m: dict) -> str:
    keys = ["loss", "sc_loss", "rtd_loss", "mlm_loss", "rtd_accuracy", "mlm_accuracy", "replaced_fraction",
            "lr", "grad_norm", "skipped_steps", "tokens_per_s", "mfu", "data_wait_s"]
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m and not math.isnan(m[k])]
    return f"[train] step {step} {phase.name}: " + " ".join(parts)
