"""The FLOPs model: training FLOPs of one sample in each phase of the curriculum, by part.

Matmuls only, as MFU conventions count them; forward + backward = 3 x forward. Pure Python.
By the model's kind (``model.*``): the feed-forward's matmuls are ``wi_0``, ``wi_1``, ``wo`` when
gated (gated-gelu, gated-silu) and ``wi``, ``wo`` for T5 v1.0's relu; a tied LM head is one matmul
with the embedding, as an untied one with its own weight (the ``d_model**-0.5`` rescale is no
matmul); relative-position bias, per stack or per layer, is a lookup and an add (no matmul).
Checked against ``torch.utils.flop_counter`` on the built model (tests/plan/test_flops.py,
tools/bench_flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from spactor_mega.config import Config
from spactor_mega.plan.derived import generator_num_layers


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one sample (forward + backward = 3x forward), by part."""

    discriminator: float
    generator: float
    rtd_head: float

    @property
    def hybrid(self) -> float:
        return self.discriminator + self.generator + self.rtd_head

    @property
    def sc_only(self) -> float:
        return self.discriminator


def attention_score_flops(queries: int, keys: int, inner: int) -> float:
    """Forward FLOPs of QK^T and AV: the core attention, which selective recompute repeats."""
    return 2 * 2 * queries * keys * inner


def feed_forward_matmuls(feed_forward: str) -> int:
    """The feed-forward's ``d x d_ff`` matmuls per token: gated wi_0, wi_1, wo; relu wi, wo."""
    return 2 if feed_forward == "relu" else 3


def _layer_flops(tokens: int, d: int, inner: int, d_ff: int, context: int, feed_forward: str) -> float:
    """Forward FLOPs of one T5 encoder layer: attention projections, scores, the FFN of ``feed_forward``."""
    projections = 2 * tokens * d * inner * 4  # q, k, v, o
    scores = attention_score_flops(tokens, context, inner)
    ffn = 2 * tokens * d * d_ff * feed_forward_matmuls(feed_forward)
    return projections + scores + ffn


def sample_flops(cfg: Config, encoder_length: int, decoder_length: int, vocab_size: int, mlm_positions: int) -> StepFlops:
    """FLOPs model of one training sample, both stages (matmuls only, as MFU conventions do)."""
    m, g = cfg.model, cfg.generator
    d, inner = m.d_model, m.num_heads * m.d_kv
    se, sd = encoder_length, decoder_length
    ff = m.feed_forward
    encoder = m.num_encoder_layers * _layer_flops(se, d, inner, m.d_ff, se, ff)
    decoder_layer = (
        _layer_flops(sd, d, inner, m.d_ff, sd, ff)  # self-attention + FFN
        + 2 * sd * d * inner * 2  # cross-attention q, o on decoder tokens
        + 2 * se * d * inner * 2  # cross-attention k, v on encoder outputs
        + attention_score_flops(sd, se, inner)  # cross-attention scores and AV
    )
    lm_head = 2 * sd * d * vocab_size  # tied or not: one [d, vocab] matmul
    discriminator = 3 * (encoder + m.num_decoder_layers * decoder_layer + lm_head)

    g_inner = (g.num_heads or m.num_heads) * m.d_kv
    g_layers = generator_num_layers(cfg) * _layer_flops(se, d, g_inner, g.d_ff or m.d_ff, se, ff)
    generator = 3 * (g_layers + 2 * mlm_positions * d * vocab_size)
    rtd_head = 3 * 2 * se * (d * d + d)
    return StepFlops(discriminator=discriminator, generator=generator, rtd_head=rtd_head)


def gradient_cosine_flops(cfg: Config, flops: StepFlops) -> float:
    """FLOPs of one gradient-agreement measurement (:mod:`spactor_mega.training.grad_agreement`) in
    the whole run: a forward and a backward of the hybrid step per loss (SC alone, auxiliary
    alone) on one micro-batch of ``train.micro_batch_size``, computed by one DP replica:
    ``2 x flops.hybrid x micro_batch_size``, times PP with virtual pipeline stages (Megatron's
    interleaved schedule needs PP micro-batches: the micro-batch is run PP times). Exact for the
    Megatron engine, whose schedule back-propagates the whole step in both passes (the other side's
    terms with weight 0; tests/training/test_grad_agreement.py counts it); an upper bound for
    DeepSpeed's ``torch.autograd.grad``, which skips the weight gradients outside D's embedding and
    encoder. Per step on average: divide by the measurement interval."""
    p = cfg.parallel
    copies = p.pipeline_model_parallel_size if p.virtual_pipeline_model_parallel_size > 1 else 1
    return 2 * flops.hybrid * cfg.train.micro_batch_size * copies


def format_flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}FLOP"
    return f"{value:.0f} FLOP"
