"""SpacTor's step under pipeline parallelism: one packed tensor through Megatron's schedules.

Stage 0 embeds the encoder input and the decoder input and sends ONE packed tensor
``[s_enc + s_dec, micro_batch, hidden]`` down Megatron's non-interleaved schedule
(``get_forward_backward_func()`` with ``seq_length = s_enc + s_dec``, ``decoder_seq_length``
unset, so every p2p message has one shape), or with virtual stages its interleaved schedule,
one data iterator per chunk (each yields ``(micro-batch index, batch)``). Encoder-layer stages
update the encoder part and pass the decoder part through; the stage holding the last encoder
layer applies the encoder's final norm; decoder-layer stages update the decoder part and
cross-attend to the encoder part; the last stage computes D's losses (LM head + vocab-parallel
CE on the decoder part; in the hybrid phase the RTD head on the encoder part). See
:meth:`~spactor_mega.model.t5.T5Discriminator.stage_forward`; the stages are built by
:mod:`spactor_mega.model.stages`.

The generator G (hybrid phase) lives on stage 0 with D's embedding. Stage 0 runs G for ALL
micro-batches of the step BEFORE the D pipeline (:func:`run_generator`): forward, Gumbel-max
replacements, and backward of ``mlm_weight * L_mlm / num_microbatches`` (the same scaling the
schedule gives D's loss), so G's gradient and its share of the embedding gradient are in place
before the schedule starts. It then broadcasts, per micro-batch, ``is_replaced`` and the MLM
metrics over the pipeline group: the last stage needs ``is_replaced`` for the RTD loss and adds
the (detached) MLM loss to the reported total. Stage 0 keeps ``d_input`` (only it embeds). Cost:
stage 0 does G's work outside the 1F1B steady state (a longer warm-up bubble for the other
stages); running G inside stage 0's forward step is the alternative to measure.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from spactor_mega.curriculum import Phase
from spactor_mega.model.spactor import unwrap
from spactor_mega.model.stages import allreduce_relative_bias_grads, as_chunks
from spactor_mega.training.metrics import average_metrics, metrics_reducer


def run_generator(objective, micro_batches: list, d, g, *, backward: bool = True, config=None) -> list:
    """Stage 0 runs G on every micro-batch (forward, sampling, and backward of its scaled MLM
    loss); every pipeline rank gets, per micro-batch, ``is_replaced`` and the MLM metrics.
    Returns one dict per micro-batch: ``is_replaced``, ``mlm_loss``, ``mlm_accuracy`` (floats
    as 0-d tensors) and on stage 0 ``d_input``. Collective over the pipeline group."""
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    n = len(micro_batches)
    scale = 1.0 / n
    group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_first_rank()
    out = []
    for i, batch in enumerate(micro_batches):
        b, s = batch["enc_tokens"].shape
        buf = torch.zeros(b * s + 2, dtype=torch.float64)
        item = {}
        if first:
            gen = objective.generator_pass(batch, d, g)
            if backward and torch.is_grad_enabled():
                loss = objective.mlm_weight * gen["mlm_loss"] * scale
                if config is not None and config.grad_scale_func is not None:
                    loss = config.grad_scale_func(loss)
                loss.backward()
            item["d_input"] = gen["d_input"]
            buf[: b * s] = gen["is_replaced"].reshape(-1).to(torch.float64)
            buf[b * s] = gen["mlm_loss"].detach().to(torch.float64)
            buf[b * s + 1] = gen["mlm_accuracy"].to(torch.float64)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(buf, src=src, group=group)
        item["is_replaced"] = buf[: b * s].view(b, s) > 0.5
        item["mlm_loss"], item["mlm_accuracy"] = buf[b * s].float(), buf[b * s + 1].float()
        out.append(item)
    return out


def make_forward_step(objective, rtd_head=None, generated: Optional[list] = None):
    """The ``forward_step_func`` for Megatron's schedule: this stage's (chunk's) part of D; on
    the last stage D's losses (the returned loss excludes G's MLM term, already back-propagated
    by :func:`run_generator`; the reported ``loss`` includes it). The data iterator yields
    ``(micro-batch index, batch)``: with virtual stages each chunk reads its own iterator."""
    def forward_step(data_iterator, model):
        i, batch = next(data_iterator)
        d = unwrap(model)
        gen = generated[i] if generated is not None else None  # None: the SC-only phase
        tokens = None
        if d.pre_process:
            tokens = gen["d_input"] if gen is not None else batch["enc_tokens"]
        out = d.stage_forward(tokens, batch["dec_input"], batch["enc_mask"])
        if not d.post_process:
            return out, _no_loss
        loss, metrics = objective.discriminator_losses(batch, d, unwrap(rtd_head), *out, gen)

        return loss, metrics_reducer(metrics)

    return forward_step


def _no_loss(output_tensor):  # never called: Megatron applies loss functions on the last stage only
    raise RuntimeError("loss function called on a non-last pipeline stage")


def pipeline_step(objective, micro_batches: list, d, g=None, rtd_head=None, *, phase: Phase,
                  forward_only: bool = False, reduce_bias_grads: bool = True) -> dict:
    """One step of D's pipeline (and G before it on stage 0 in the hybrid phase): gradients
    accumulate in place (not stepped). Returns the micro-batch-averaged metrics on every rank
    (broadcast from the last stage). ``d``: this rank's D stage, or its list of chunks (virtual
    stages, Megatron's interleaved schedule); either may be wrapped (DDP)."""
    chunks = as_chunks(d)
    inner = [unwrap(c) for c in chunks]
    generated = None
    if phase is Phase.HYBRID:
        with torch.set_grad_enabled(not forward_only):
            generated = run_generator(objective, micro_batches, inner[0], unwrap(g),
                                      backward=not forward_only, config=inner[0].config)
    b, s_enc = micro_batches[0]["enc_tokens"].shape
    s_dec = micro_batches[0]["dec_input"].shape[1]
    iterators = [iter(list(enumerate(micro_batches))) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(objective, rtd_head, generated),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=s_enc + s_dec,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    if reduce_bias_grads and not forward_only:
        allreduce_relative_bias_grads(inner)
    metrics = [average_metrics(outputs)] if ps.is_pipeline_last_stage(ignore_virtual=True) else [None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(metrics, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    return metrics[0]
