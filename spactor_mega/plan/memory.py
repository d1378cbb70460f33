"""Per-rank memory of the model states (parameters, gradients, optimizer) for an engine setup.

Activations are not included (they depend on micro-batch, lengths and recomputation). Where each
engine keeps what is the engine's own plan (:mod:`spactor_mega.plan.engines`).
"""

from __future__ import annotations

from spactor_mega.config import Config
from spactor_mega.plan.derived import uses_bf16
from spactor_mega.plan.engines import engine_spec
from spactor_mega.plan.inventory import (
    count,
    generator_parameter_shapes,
    rtd_head_parameter_shapes,
    t5_parameter_shapes,
)

GIB = 1024 ** 3


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    """``{"gpu": {...}, "cpu": {...}}`` bytes of params / grads / optimizer on one rank.
    ``params_per_rank``: parameters this rank holds before any ZeRO split (after TP)."""
    return engine_spec(cfg.train.engine).plan.model_state_bytes(cfg, params_per_rank, dp)


def checkpoint_bytes(cfg: Config, vocab_size: int) -> float:
    """About the bytes of one checkpoint: the weights and optimizer state of D, G and the RTD head
    as the engine keeps them (Adafactor's factored moments not counted)."""
    n = sum(count(shapes) for shapes in (t5_parameter_shapes(cfg.model, vocab_size), generator_parameter_shapes(cfg),
                                         rtd_head_parameter_shapes(cfg.model.d_model)))
    est = model_state_bytes(cfg, n, 1)
    return sum(est[where]["params"] + est[where]["optimizer"] for where in ("gpu", "cpu"))


def describe_memory(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    """The ``--dry-run`` lines: our per-rank estimate, and the engine's own where it has one."""
    plan = engine_spec(cfg.train.engine).plan
    est = plan.model_state_bytes(cfg, params_per_rank, dp)

    def line(where: str) -> str:
        parts = est[where]
        return (f"{where.upper()} {sum(parts.values()) / GIB:,.2f} GiB (params {parts['params'] / GIB:,.2f}, "
                f"grads {parts['grads'] / GIB:,.2f}, optimizer {parts['optimizer'] / GIB:,.2f})")

    return [f"memory per rank, model states only ({plan.describe_setup(cfg)}, DP {dp}, "
            f"{'bf16' if uses_bf16(cfg) else 'fp32'}): {line('gpu')}; {line('cpu')}; plus activations",
            *plan.extra_memory_lines(cfg, params_per_rank, dp)]


RECOMPUTE = ("none", "selective", "full")


def activation_bytes(cfg: Config, encoder_length: int, decoder_length: int, recompute: str) -> float:
    """Activation memory D's layers keep for backward, per micro-batch on one rank (TP splits the
    per-head and per-d_ff parts; PP assumed even), with ``recompute`` as ``model.recompute``.

    Per layer, in the manner of Korthikanti et al. (2022), 2-byte activations and 1-byte dropout
    masks, s tokens, b rows, h = d_model, a heads (a/TP per rank), f = d_ff: attention
    ``11 s b h + 5 a s s_kv b`` (the last term: scores, softmax and its dropout, which selective
    recompute drops), gated-GELU MLP ``3 s b h + 6 s b f``, two norms ``4 s b h``; decoder layers add a
    cross-attention block over the ``s_enc`` encoder tokens. Full recompute keeps each layer's input
    (``2 s b h``) and recomputes the rest. ``parallel.sequence_parallel`` keeps the ``s b h`` parts
    (norms, dropout, the linears' inputs) on a 1/TP shard of the sequence as well (Korthikanti et
    al.'s ``/ t`` for every term). Approximate by design: the dry run's guide, not a bound.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    m, t, p = cfg.model, cfg.train, cfg.parallel
    b, h, tp = t.micro_batch_size, m.d_model, p.tensor_model_parallel_size
    a, f = m.num_heads / tp, m.d_ff / tp
    if p.sequence_parallel:
        h = h / tp  # every s b h term is on a sequence shard (h appears in no other term)
    heads_term = 0.0 if recompute == "selective" else 1.0

    def attention(s_q: int, s_kv: int) -> float:
        return 11 * s_q * b * h + heads_term * 5 * a * s_q * s_kv * b

    def layer(s: int, cross: bool) -> float:
        if recompute == "full":
            return 2 * s * b * h
        total = attention(s, s) + 3 * s * b * h + 6 * s * b * f + 4 * s * b * h
        if cross:
            total += attention(s, encoder_length) + 2 * s * b * h + 4 * encoder_length * b * h  # + its norm, k/v inputs
        return total

    total = (m.num_encoder_layers * layer(encoder_length, cross=False)
             + m.num_decoder_layers * layer(decoder_length, cross=True))
    return total / p.pipeline_model_parallel_size


def describe_activations(cfg: Config, encoder_length: int, decoder_length: int) -> str:
    """The ``--dry-run`` line: activations per micro-batch under each ``model.recompute``."""
    parts = ", ".join(f"{r} {activation_bytes(cfg, encoder_length, decoder_length, r) / GIB:,.2f} GiB"
                      + (" (this config)" if r == cfg.model.recompute else "") for r in RECOMPUTE)
    return f"D's activations per micro-batch of {cfg.train.micro_batch_size} per rank (estimate): {parts}"
