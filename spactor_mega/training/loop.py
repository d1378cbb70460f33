"""The training loop: data -> (stage-aware) batches -> engine step -> logs and checkpoints.

Readable top to bottom, in the manner of nanoT5: everything engine-specific (DDP,
optimizers, schedules, sharded state) lives behind the engine; everything data-specific
behind the dataset and the batch builder. The step index decides the stage; from tau on
the generator and its optimizer are released and batches stop carrying MLM fields.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from spactor_mega.config import Config, generator_num_layers, uses_bf16, validate
from spactor_mega.training.schedule import Stage, format_flops, sample_flops, stage_at


@dataclass
class RunResult:
    step: int
    checkpoint: Optional[Path]
    tensorboard_dir: str
    history: list[dict] = field(default_factory=list)  # per-step metrics (rank 0)
    evals: list[dict] = field(default_factory=list)


def train(cfg: Config) -> RunResult:
    from megatron.core import parallel_state as ps

    from spactor_mega.checkpoint.megatron import (
        check_resumable, find_checkpoint, load_model_weights, make_record, read_record,
    )
    from spactor_mega.data.dataset import PretrainingSampler, SpactorBatchBuilder, build_datasets, collate_raw
    from spactor_mega.data.prepare import ensure_data
    from spactor_mega.data.span_corruption import SpanCorruption
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
    from spactor_mega.model.spactor import build_spactor_modules
    from spactor_mega.model.t5 import model_vocab_size
    from spactor_mega.parallel.layout import config_layout
    from spactor_mega.parallel.pipeline import as_chunks
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.training.engines import build_engine
    from spactor_mega.training.metrics import RunLogger

    p, t = cfg.parallel, cfg.train
    initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, t.seed,
                        vp=p.virtual_pipeline_model_parallel_size)
    world = torch.distributed.get_world_size()
    validate(cfg, world)
    rank = torch.distributed.get_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    # Data -----------------------------------------------------------------------------
    if rank == 0:
        ensure_data(cfg)
    torch.distributed.barrier()
    tokenizer = T5SentencePieceTokenizer(cfg.data.tokenizer)
    corruption = SpanCorruption(
        cfg.data.encoder_seq_length, tokenizer.first_sentinel_id, tokenizer.num_sentinels,
        cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length,
    )
    builder = SpactorBatchBuilder(corruption, tokenizer.sp_size, cfg.spactor.mlm_fraction)
    train_set, valid_set = build_datasets(
        cfg.data.train_data, cfg.data.valid_data, cfg.data.split, corruption, t.seed,
        t.steps * t.global_batch_size, max(t.eval_batches * t.micro_batch_size * dp_size, 1), cfg.data.cache_dir,
    )

    # Model and engine -------------------------------------------------------------------
    vocab = model_vocab_size(cfg.model, tokenizer.model_vocab_size, p.tensor_model_parallel_size)
    layout = config_layout(cfg, vocab)  # this rank builds its stage of it (all of D when PP = 1)
    checkpoint = find_checkpoint(t.resume, t.save_dir)
    record = read_record(checkpoint) if checkpoint else {"step": 0, "consumed_samples": 0}
    if checkpoint is not None:
        check_resumable(checkpoint, record, cfg, vocab, layout.describe())
    step, consumed = int(record["step"]), int(record["consumed_samples"])
    bf16 = uses_bf16(cfg)
    d, g, rtd = build_spactor_modules(
        cfg, vocab, with_generator=stage_at(step, cfg.spactor.tau) is Stage.HYBRID,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, stage_split=layout.stage_split(),
    )
    weights_only = checkpoint is not None and record.get("weights_only", False)
    if weights_only:  # an imported model: D's weights; G, the RTD head and optimizers start afresh
        for chunk in as_chunks(d):  # virtual stages: one load per chunk
            load_model_weights(checkpoint, chunk)
    engine = build_engine(cfg, d, g, rtd, _loss_fn(cfg, tokenizer), bf16)
    if checkpoint is not None and not weights_only:
        engine.load(checkpoint)

    flops = sample_flops(cfg, corruption.encoder_length, corruption.decoder_length, vocab, builder.mlm_capacity)
    log = RunLogger(cfg.logging.tensorboard_dir, t.steps, step, enabled=rank == 0, progress=cfg.logging.progress)
    counts = engine.parameter_counts()
    pipeline = ""
    if p.pipeline_model_parallel_size > 1:
        virtual = p.virtual_pipeline_model_parallel_size
        pipeline = f" (layout {layout.describe()}" + (f", {virtual} virtual stages per rank)" if virtual > 1 else ")")
    log.line(
        f"[train] world {world} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x DP {dp_size}"
        f"{pipeline}; "
        f"D {counts['discriminator'] / 1e6:.2f}M params per rank, G {generator_num_layers(cfg)} layers "
        f"{counts['generator'] / 1e6:.2f}M; {'bf16' if bf16 else 'fp32'}; tau={cfg.spactor.tau}; "
        f"FLOPs/sample hybrid {format_flops(flops.hybrid)}, SC-only {format_flops(flops.sc_only)}"
        + (f"; resumed from {checkpoint} at step {step}" if checkpoint else "")
    )

    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    sampler = PretrainingSampler(t.steps * t.global_batch_size, consumed, t.micro_batch_size, dp_rank, dp_size)
    loader = iter(torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate_raw, num_workers=cfg.data.num_workers,
    ))
    result = RunResult(step=step, checkpoint=checkpoint, tensorboard_dir=cfg.logging.tensorboard_dir)

    def save(at_step: int) -> Path:
        return engine.save(t.save_dir, at_step, make_record(cfg, at_step, vocab, pipeline_layout=layout.describe()),
                           tokenizer.model_file)

    eval_multiple = p.pipeline_model_parallel_size if p.virtual_pipeline_model_parallel_size > 1 else 1
    if step == 0 and t.eval_interval > 0 and valid_set is not None:
        hybrid = stage_at(0, cfg.spactor.tau) is Stage.HYBRID
        evaluation = evaluate(engine, valid_set, builder, t, dp_rank, dp_size, hybrid, 0, eval_multiple)
        result.evals.append({"step": 0, **evaluation})
        log.scalars(0, evaluation, prefix="valid")
        log.line(_format_eval(0, evaluation))

    last_time = time.perf_counter()
    while step < t.steps:
        stage = stage_at(step, cfg.spactor.tau)
        hybrid = stage is Stage.HYBRID
        if not hybrid and engine.has_generator:
            engine.release_generator()
            counts = engine.parameter_counts()
            log.line(f"[train] step {step}: tau reached, SC only from here; generator released "
                     f"(G params {counts['generator']}, G optimizer state {counts['generator_optimizer_state']})")
        raws = [next(loader) for _ in range(accumulation)]
        micro_batches = [builder(r["raw"], r["key"], with_mlm=hybrid) for r in raws]
        metrics = engine.train_step(micro_batches, hybrid=hybrid, step=step)
        step += 1

        now = time.perf_counter()
        seconds, last_time = now - last_time, now
        sample_cost = flops.hybrid if hybrid else flops.sc_only
        counts = engine.parameter_counts()
        metrics.update(
            stage=float(stage.value), step_time_s=seconds,
            generator_params=float(counts["generator"]),
            generator_optimizer_state=float(counts["generator_optimizer_state"]),
            tokens_per_s=t.global_batch_size * corruption.encoder_length / seconds,
            flops_per_step=sample_cost * t.global_batch_size,
            tflops_per_s_per_rank=sample_cost * t.global_batch_size / seconds / world / 1e12,
        )
        result.history.append({"step": step, **metrics})
        log.scalars(step, metrics)
        log.advance(stage.name, metrics["loss"])
        if step % cfg.logging.log_interval == 0 or step == t.steps:
            log.line(_format(step, stage, metrics))
        if t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.steps) and valid_set is not None:
            evaluation = evaluate(engine, valid_set, builder, t, dp_rank, dp_size, hybrid, step, eval_multiple)
            result.evals.append({"step": step, **evaluation})
            log.scalars(step, evaluation, prefix="valid")
            log.line(_format_eval(step, evaluation))
        exiting = bool(t.exit_interval) and step % t.exit_interval == 0 and step < t.steps
        if (t.save_interval > 0 and step % t.save_interval == 0) or step == t.steps or exiting:
            result.checkpoint = save(step)
        if exiting:
            log.line(f"[train] exit interval reached at step {step}; resume with --train.resume auto")
            break

    log.close()
    result.step = step
    if rank == 0:
        print(f"[train] done: checkpoint {result.checkpoint}, TensorBoard logs {cfg.logging.tensorboard_dir} "
              f"(tensorboard --logdir {cfg.logging.tensorboard_dir})", flush=True)
    return result


def evaluate(engine, valid_set, builder, t, dp_rank: int, dp_size: int, hybrid: bool, step: int,
             multiple: int = 1) -> dict[str, float]:
    """Validation losses on the first ``eval_batches`` micro-batches of the held-out split, cut to a
    multiple of ``multiple`` (Megatron's interleaved schedule needs a multiple of PP)."""
    from spactor_mega.data.dataset import PretrainingSampler, collate_raw

    sampler = PretrainingSampler(min(len(valid_set), t.eval_batches * t.micro_batch_size * dp_size), 0,
                                 t.micro_batch_size, dp_rank, dp_size)
    micro_batches = []
    for indices in sampler:
        raw = collate_raw([valid_set[i] for i in indices])
        micro_batches.append(builder(raw["raw"], raw["key"], with_mlm=hybrid))
    micro_batches = micro_batches[: len(micro_batches) // multiple * multiple]
    if not micro_batches:
        return {}
    metrics = engine.eval_step(micro_batches, hybrid=hybrid, step=step)
    return {k: v for k, v in metrics.items() if k.startswith("loss") or k.endswith("loss") or k.startswith("sc")}


def _loss_fn(cfg: Config, tokenizer):
    from spactor_mega.model.spactor import HYBRID, SC_ONLY, SpactorObjective

    # Sentinels, the mask token and padded rows (ids >= sp_size) are never sampled; nor pad/EOS.
    objective = SpactorObjective.from_config(cfg, mask_id=tokenizer.mask_id, sample_vocab_size=tokenizer.sp_size)

    def loss(batch, d, g, rtd, hybrid: bool, step: int, micro_batch: int):
        return objective(batch, d, g, rtd, stage=HYBRID if hybrid else SC_ONLY, step=step, micro_batch=micro_batch)

    loss.objective = objective  # the pipeline (PP > 1) calls its stage pieces
    return loss


def _format_eval(step: int, evaluation: dict[str, float]) -> str:
    return f"[valid] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in evaluation.items())


def _format(step: int, stage: Stage, m: dict) -> str:
    keys = ["loss", "sc_loss", "rtd_loss", "mlm_loss", "rtd_accuracy", "mlm_accuracy", "replaced_fraction",
            "lr", "grad_norm", "tokens_per_s"]
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m and not math.isnan(m[k])]
    return f"[train] step {step} {stage.name}: " + " ".join(parts)
