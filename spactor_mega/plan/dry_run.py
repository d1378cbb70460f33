"""``spactor train --dry-run``: a config's sizes and per-step FLOPs, without building it."""

from __future__ import annotations

from spactor_mega.config import Config, ModelConfig
from spactor_mega.curriculum import Phase, describe_tau, tau_bound
from spactor_mega.data.span_corruption import (
    mlm_capacity,
    noise_counts,
    random_spans_helper,
)
from spactor_mega.plan.derived import generator_num_layers
from spactor_mega.plan.flops import format_flops, sample_flops
from spactor_mega.plan.inventory import (
    count,
    generator_parameter_shapes,
    rtd_head_parameter_shapes,
    t5_parameter_shapes,
)
from spactor_mega.plan.layout import DEFAULT_VOCAB_SIZE, config_layout, replans_at_tau
from spactor_mega.plan.memory import describe_activations, describe_memory
from spactor_mega.plan.scale import Hardware, describe_scale, predict


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Parameter counts of D (a T5 of ``model``'s kind), G (without the shared embedding) and the RTD head."""
    return {"discriminator": count(t5_parameter_shapes(cfg.model, vocab_size)),
            "generator": count(generator_parameter_shapes(cfg)),
            "rtd_head": count(rtd_head_parameter_shapes(cfg.model.d_model))}


def describe_kind(m: ModelConfig) -> str:
    """The model's kind in one line: feed-forward, LM head, position bias, HF model type."""
    head = "tied to the embedding (decoder output x d_model**-0.5)" if m.tie_word_embeddings else "untied"
    bias = "one per layer" if m.relative_attention_per_layer else "one per stack"
    return (f"model: feed-forward {m.feed_forward}, LM head {head}, relative position bias {bias}, "
            f"HF model type {m.hf_model_type}")


def describe(cfg: Config, vocab_size: int | None = None, world_size: int | None = None,
             hardware: Hardware | None = None) -> str:
    """The dry run's text; with ``hardware``, the scale model's prediction for ``world_size`` GPUs of it.
    ``vocab_size``: the embedding's rows; None: ``model.vocab_size`` (an imported model's, e.g. mT5's
    250,112) or T5's 32,128."""
    vocab_size = vocab_size or cfg.model.vocab_size or DEFAULT_VOCAB_SIZE
    s = cfg.data.encoder_seq_length
    raw, targets = random_spans_helper(s, cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length)
    _, spans = noise_counts(raw, cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length)
    flops = sample_flops(cfg, s, targets, vocab_size, mlm_capacity(s, spans, cfg.spactor.mlm_fraction))
    counts = parameter_counts(cfg, vocab_size)
    batch = cfg.train.global_batch_size
    lines = [
        "config is valid",
        f"lengths: raw {raw} -> encoder {s} + decoder {targets} tokens ({spans} spans)",
        describe_kind(cfg.model),
        f"parameters (vocab {vocab_size}): D {counts['discriminator'] / 1e6:,.1f}M, "
        f"G {counts['generator'] / 1e6:,.1f}M ({generator_num_layers(cfg)} layers, embedding shared), "
        f"RTD head {counts['rtd_head'] / 1e6:,.2f}M",
        f"FLOPs per step (batch {batch}): hybrid phase {format_flops(flops.hybrid * batch)}, "
        f"SC-only phase {format_flops(flops.sc_only * batch)}, ratio {flops.hybrid / flops.sc_only:.3f}",
        f"tau {describe_tau(cfg.spactor)}, steps {cfg.train.steps}: total {format_flops(_total(cfg, flops) * batch)}"
        + (" (at most: tau auto ends the hybrid phase by auto_tau.max_steps)" if cfg.spactor.tau == "auto" else ""),
    ]
    lines += _memory(cfg, counts, world_size)
    lines.append(describe_activations(cfg, s, targets))
    if cfg.parallel.pipeline_model_parallel_size > 1 or cfg.parallel.pipeline_layout:
        layout = config_layout(cfg, vocab_size)
        how = "given" if cfg.parallel.pipeline_layout else f"FLOPs-balanced at vocab {vocab_size}"
        lines.append(f"pipeline layout ({layout.num_stages} stages, {how}): {layout.describe()}")
        hybrid = config_layout(cfg, vocab_size, Phase.HYBRID)
        if hybrid != layout:
            lines.append(f"  before tau (G's FLOPs on stage 0): {hybrid.describe()}"
                         + (", re-planned at tau" if replans_at_tau(cfg) else ""))
    if hardware is not None:
        if cfg.train.engine == "megatron":
            p = cfg.parallel
            world = world_size or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
            lines += describe_scale(predict(cfg, world, hardware, vocab_size))
        else:
            lines.append(f"scale model: the Megatron engine's step only (train.engine is {cfg.train.engine})")
    return "\n".join(lines)


def _memory(cfg: Config, counts: dict[str, int], world_size: int | None) -> list[str]:
    """Per-rank model-state memory in stage 1 (D + G + RTD head), D's share split by TP (and
    evenly by PP, an approximation); G and the head are whole on every rank that holds them."""
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    dp = max((world_size or model_parallel) // model_parallel, 1)
    per_rank = counts["discriminator"] // model_parallel + counts["generator"] + counts["rtd_head"]
    return describe_memory(cfg, per_rank, dp)


def _total(cfg: Config, flops) -> float:
    hybrid_steps = min(tau_bound(cfg.spactor), cfg.train.steps)
    return hybrid_steps * flops.hybrid + (cfg.train.steps - hybrid_steps) * flops.sc_only
