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

The generator G (hybrid phase) lives on stage 0 (virtual stage 0) with D's embedding and runs
INSIDE the schedule: stage 0's forward step for micro-batch ``i`` runs G's forward, samples the
replacements and embeds D's input, and G's MLM loss joins the autograd graph of the stage's
output (:class:`_PackWithGeneratorLoss`), so the schedule's backward of micro-batch ``i`` on
stage 0 back-propagates D's stage-0 part and ``mlm_weight * L_mlm / num_microbatches`` together
(the scaling the schedule gives D's loss). That is one backward per micro-batch, as with PP = 1:
the shared embedding's gradient accumulates once per micro-batch (what Megatron DDP's grad-ready
hooks expect with ``overlap_grad_reduce``), and G's activations live from a micro-batch's forward
to its backward, like D's (at most PP micro-batches in flight under 1F1B).

The last stage needs ``is_replaced`` (the RTD labels) of micro-batch ``i``: it rides in the
packed tensor as ``side_rows(s_enc, hidden)`` extra rows after the ``s_enc + s_dec`` of D (0/1,
exact in any float dtype); middle stages pass them through and the gradient they get is zero.
Megatron's schedules send one tensor per micro-batch, so packing keeps every message in the
schedule's own order. The (detached) MLM metrics stay on stage 0 and join the last stage's metrics
after the schedule, in one all-reduce over the pipeline group that also hands every stage the
step's metrics (:func:`_pipeline_metrics`), read on the host once per step.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from spactor_mega.curriculum import Phase
from spactor_mega.data.host_side import encoder_padding
from spactor_mega.model.spactor import unwrap
from spactor_mega.parallel import collectives
from spactor_mega.model.stages import allreduce_shared_grads, as_chunks
from spactor_mega.training.metrics import average_metrics, mean_of_micro_batches, metrics_reducer


def side_rows(encoder_length: int, hidden: int) -> int:
    """Rows of ``hidden`` values the packed tensor carries ``is_replaced`` ``[b, encoder_length]`` in."""
    return math.ceil(encoder_length / hidden)


def _encode_replaced(is_replaced: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """``is_replaced [b, s]`` as ``[side_rows, b, hidden]`` rows of 0/1 (zero-padded)."""
    b, s = is_replaced.shape
    rows = side_rows(s, hidden)
    flat = torch.zeros(b, rows * hidden, dtype=dtype, device=is_replaced.device)
    flat[:, :s] = is_replaced.to(dtype)
    return flat.view(b, rows, hidden).transpose(0, 1)


def _decode_replaced(side: torch.Tensor, encoder_length: int) -> torch.Tensor:
    """Inverse of :func:`_encode_replaced`: ``[side_rows, b, hidden]`` -> bool ``[b, s]``."""
    rows, b, hidden = side.shape
    return side.transpose(0, 1).reshape(b, rows * hidden)[:, :encoder_length] > 0.5


class _PackWithGeneratorLoss(torch.autograd.Function):
    """Stage 0's output: ``cat([d_part, side])``, with G's loss hung on its graph. Backward hands
    ``d_part`` its rows of the output gradient and G's loss the constant ``loss_grad`` (the
    derivative of the step's loss by it), so the schedule's one backward of the output runs D's
    and G's backward together. Megatron's ``MoEAuxLossAutoScaler`` does the same for MoE's loss,
    but with one process-wide scale that its schedules set only for MoE models, and it returns its
    input (a view), which ``deallocate_pipeline_outputs`` refuses; the cat here is a new tensor."""

    @staticmethod
    def forward(ctx, d_part, side, generator_loss, loss_grad):
        ctx.rows = d_part.size(0)
        ctx.save_for_backward(loss_grad)
        ctx.loss_shape = generator_loss.shape
        return torch.cat([d_part, side], dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        (loss_grad,) = ctx.saved_tensors
        return grad_output[: ctx.rows], None, loss_grad.expand(ctx.loss_shape), None


def make_forward_step(objective, rtd_head=None, g=None, *, hybrid: bool, num_microbatches: int,
                      generator_metrics: list):
    """The ``forward_step_func`` for Megatron's schedule: this stage's (chunk's) part of D; in the
    hybrid phase G on (virtual) stage 0 and the RTD labels carried to the last stage (see the
    module docstring); on the last stage D's losses. ``generator_metrics`` collects stage 0's
    detached ``(mlm_loss, mlm_accuracy)`` per micro-batch when it is not also the last stage. The
    data iterator yields ``(micro-batch index, batch)``: with virtual stages each chunk reads its own."""

    def forward_step(data_iterator, model):
        _, batch = next(data_iterator)
        d = unwrap(model)
        gen = None
        mask = (batch["enc_mask"], encoder_padding(batch))
        if not hybrid:
            out = d.stage_forward(batch["enc_tokens"] if d.pre_process else None, batch["dec_input"], *mask)
        elif d.pre_process:
            gen = objective.generator_pass(batch, d, unwrap(g))
            out = d.stage_forward(gen["d_input"], batch["dec_input"], *mask)
            if not d.post_process:
                generator_metrics.append(torch.stack([gen["mlm_loss"].detach().double(), gen["mlm_accuracy"].double()]))
                out = _pack(out, gen, d.config, num_microbatches, objective.mlm_weight)
        else:  # split the received tensor: D's rows into the stage, the RTD labels aside
            received = d.input_tensor
            rows = side_rows(batch["enc_tokens"].size(1), received.size(-1))
            d.set_input_tensor(received[:-rows])
            out = d.stage_forward(None, batch["dec_input"], *mask)
            side = received[-rows:].detach()
            if not d.post_process:
                out = torch.cat([out, side], dim=0)
            else:  # MLM placeholders: stage 0's values replace them after the schedule
                zero = received.new_zeros((), dtype=torch.float32)
                gen = {"is_replaced": _decode_replaced(side, batch["enc_tokens"].size(1)),
                       "mlm_loss": zero, "mlm_accuracy": zero}
        if not d.post_process:
            return out, _no_loss
        loss, metrics = objective.discriminator_losses(batch, d, unwrap(rtd_head), *out, gen)
        return loss, metrics_reducer(metrics)

    return forward_step


def _pack(d_part, gen: dict, config, num_microbatches: int, mlm_weight: float):
    """Stage 0's output in the hybrid phase: D's rows, then ``is_replaced``; G's loss on the graph."""
    side = _encode_replaced(gen["is_replaced"], d_part.size(-1), d_part.dtype)
    loss = gen["mlm_loss"]
    if not (torch.is_grad_enabled() and loss.requires_grad):  # forward only
        return torch.cat([d_part, side], dim=0)
    loss_grad = torch.tensor(mlm_weight / num_microbatches, dtype=loss.dtype, device=loss.device)
    if config.grad_scale_func is not None:  # the loss scale the schedule applies to D's loss
        loss_grad = config.grad_scale_func(loss_grad)
    return _PackWithGeneratorLoss.apply(d_part, side, loss, loss_grad)


def _no_loss(output_tensor):  # never called: Megatron applies loss functions on the last stage only
    raise RuntimeError("loss function called on a non-last pipeline stage")


def _pipeline_metrics(outputs: list, names: tuple, generator_metrics: list, mlm_weight: float,
                      device: torch.device) -> dict[str, float]:
    """The step's metrics on every stage of the pipeline: the last stage's micro-batch averages, with
    stage 0's MLM loss and accuracy in place of the placeholders (0 there) and the MLM term added to
    ``loss``. One all-reduce (a sum) over the pipeline group of a vector only the last stage and, for
    the MLM entries, stage 0 fill; one host read. ``device``: the parameters'."""
    values = (mean_of_micro_batches(outputs, names).to(device) if ps.is_pipeline_last_stage(ignore_virtual=True)
              else torch.zeros(len(names), dtype=torch.float64, device=device))
    if generator_metrics:  # stage 0 in the hybrid phase
        mlm = torch.stack(generator_metrics).mean(dim=0)
        values[[names.index("mlm_loss"), names.index("mlm_accuracy")]] += mlm
    metrics = dict(zip(names, collectives.all_reduce_(values, group=ps.get_pipeline_model_parallel_group()).tolist()))
    if "mlm_loss" in metrics:
        metrics["loss"] += mlm_weight * metrics["mlm_loss"]
    return metrics


def pipeline_step(objective, micro_batches: list, d, g=None, rtd_head=None, *, phase: Phase,
                  forward_only: bool = False, reduce_bias_grads: bool = True) -> dict:
    """One step of D's pipeline (G inside it on stage 0 in the hybrid phase): gradients
    accumulate in place (not stepped). Returns the micro-batch-averaged metrics on every rank
    (reduced from the last stage and, G's, stage 0). ``d``: this rank's D stage, or its list of chunks (virtual
    stages, Megatron's interleaved schedule); either may be wrapped (DDP)."""
    chunks = as_chunks(d)
    inner = [unwrap(c) for c in chunks]
    hybrid = phase is Phase.HYBRID
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    b, s_enc = micro_batches[0]["enc_tokens"].shape
    s_dec = micro_batches[0]["dec_input"].shape[1]
    extra_rows = side_rows(s_enc, inner[0].config.hidden_size) if hybrid and pipelined else 0
    generator_metrics = []
    iterators = [iter(list(enumerate(micro_batches))) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(objective, rtd_head, g, hybrid=hybrid,
                                            num_microbatches=len(micro_batches),
                                            generator_metrics=generator_metrics),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        # Megatron divides seq_length by TP under sequence parallelism: D's rows are sequence
        # shards (the decoder padded to a multiple of TP), the side rows whole on every TP rank
        seq_length=inner[0].packed_length(s_enc, s_dec) + extra_rows * inner[0].sequence_shards,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    if reduce_bias_grads and not forward_only:
        allreduce_shared_grads(inner)
    if not pipelined:
        return average_metrics(outputs)
    return _pipeline_metrics(outputs, objective.metric_names(phase), generator_metrics, objective.mlm_weight,
                             next(inner[0].parameters()).device)
