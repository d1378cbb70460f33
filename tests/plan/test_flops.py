"""The FLOPs model (``plan/flops.py``) against ``torch.utils.flop_counter.FlopCounterMode``'s count
of one SpacTor training step (forward + backward) of the built model, for every model family, in
both phases of the curriculum.

The counter counts every matmul the step runs, as the FLOPs model does, plus one thing the model
leaves out: torch's CPU flash-attention kernel (taken by the cross-attention, which has no bias
and no dropout here) recomputes the scores ``QK^T`` in its backward, and the counter counts that
as torch counts it for the CUDA flash kernels (:func:`flop_counter_mode`, which registers the CPU
kernels the counter's registry lacks). That term is counted apart, so that the model must equal
the rest exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from spactor_mega.config import Config
from spactor_mega.curriculum import Phase
from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.model.stages import build_spactor_modules
from spactor_mega.model.synthetic import synthetic_batch, tiny_config
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.plan.flops import sample_flops

aten = torch.ops.aten

# model.* options of each public T5 family (sizes apart)
FAMILIES = {
    "t5-v1_0": dict(feed_forward="relu", tie_word_embeddings=True),
    "t5-v1_1": dict(feed_forward="gated-gelu"),
    "mt5": dict(feed_forward="gated-gelu", hf_model_type="mt5"),
    "umt5": dict(feed_forward="gated-gelu", relative_attention_per_layer=True, hf_model_type="umt5"),
    "gated-silu": dict(feed_forward="gated-silu"),
}
PHASES = (Phase.SC_ONLY, Phase.HYBRID)


@dataclasses.dataclass
class Counted:
    """FlopCounterMode's count of one step, and the part of it that is the flash backward's recompute."""

    total: int
    recompute: int

    @property
    def model_flops(self) -> int:
        """What the FLOPs model counts: all but the recompute."""
        return self.total - self.recompute


def flop_counter_mode(counted_recompute: list) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts torch's CPU flash-attention kernels (its registry has
    the CUDA ones only), with torch's own formulas for them; each backward's recompute of the
    scores is appended to ``counted_recompute``."""

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        b, heads, s_q, d_q = query
        counted_recompute.append(flop_counter.bmm_flop((b * heads, s_q, d_q), (b * heads, d_q, key[2])))
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


def count_step_flops(cfg: Config, modules, batch: dict, phase: Phase, mask_id: int, sample_vocab_size: int) -> Counted:
    """FlopCounterMode's count of one SpacTor step (the objective's forward and the loss's backward)
    of ``modules`` (D, G, RTD head, built for ``cfg``) on ``batch`` in ``phase``."""
    objective = SpactorObjective.from_config(cfg, mask_id=mask_id, sample_vocab_size=sample_vocab_size)
    recompute: list[int] = []
    with flop_counter_mode(recompute) as counter:
        loss, _ = objective(batch, *modules, phase=phase)
        loss.backward()
    for module in modules:
        module.zero_grad(set_to_none=True)
    return Counted(counter.get_total_flops(), sum(recompute))


def family_config(family: str, **sizes) -> Config:
    """A tiny config (``sizes`` override it) of ``family``'s kind, hybrid throughout."""
    return tiny_config(tau=float("inf"), depth_fraction=0.5, **{**sizes, **FAMILIES[family]})


SP_SIZE, VOCAB = 150, 384
ENCODER, DECODER, MLM_SLOTS = 32, 8, 6


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_model_is_what_the_step_runs(family):
    """Exactly the counter's matmuls, less the flash recompute, in either phase; batches of 2, so
    per sample is half. (Count the relu FFN as gated and the model is 23% over t5-v1_0's count.)"""
    cfg = family_config(family, num_encoder_layers=3)  # G: 2 layers
    batch = synthetic_batch(batch_size=2, enc_len=ENCODER, dec_len=DECODER, mlm_slots=MLM_SLOTS, sp_size=SP_SIZE)
    model = sample_flops(cfg, ENCODER, DECODER, VOCAB, MLM_SLOTS)
    with single_process_parallel(seed=1):
        modules = build_spactor_modules(cfg, VOCAB, with_generator=True)
        for phase, expected in zip(PHASES, (model.sc_only, model.hybrid)):
            counted = count_step_flops(cfg, modules, batch, phase, SP_SIZE + 100, SP_SIZE)
            assert counted.model_flops == pytest.approx(2 * expected, rel=1e-12), (phase, counted)
            # the cross-attention's recompute: one QK^T per decoder layer
            m = cfg.model
            assert counted.recompute == 2 * m.num_decoder_layers * 2 * DECODER * ENCODER * m.num_heads * m.d_kv
