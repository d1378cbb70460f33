"""Pipeline parallelism of the encoder-decoder ([3/5]): one packed tensor through Megatron's 1F1B.

Stage 0 embeds the encoder input and the decoder input and sends ONE packed tensor
``[s_enc + s_dec, micro_batch, hidden]`` down Megatron's standard non-interleaved schedule
(``get_forward_backward_func()`` with ``seq_length = s_enc + s_dec``, ``decoder_seq_length``
unset, so every p2p message has one shape). Encoder-layer stages update the encoder part and
pass the decoder part through; the stage holding the last encoder layer applies the encoder's
final norm; decoder-layer stages update the decoder part and cross-attend to the encoder part;
the last stage computes D's losses (LM head + vocab-parallel CE on the decoder part; in the
hybrid stage the RTD head on the encoder part). See :meth:`T5Discriminator.stage_forward`.

Stage split: a list with one ``(encoder_layers, decoder_layers)`` pair of global ``[start, end)``
ranges per stage; by default the config's pipeline layout
(:func:`spactor_mega.parallel.layout.config_layout`: ``parallel.pipeline_layout`` or the
FLOPs-balanced split). A stage may hold the end of the encoder and the start of the decoder.

Relative-position bias tables are replicated on every stage holding layers of that stack: equal
at build time (:func:`sync_relative_bias`, an all-reduce over the pipeline group in which
stages without the stack send zeros) and kept equal by summing their gradients over the same
group after the schedule (:func:`allreduce_relative_bias_grads`, as Megatron does for shared
embeddings). Copies on later stages are marked ``shared`` so the grad-norm counts them once.

The generator G (hybrid stage) lives on stage 0 with D's embedding. Choice made here: stage 0
runs G for ALL micro-batches of the step BEFORE the D pipeline (:func:`run_generator`): forward,
Gumbel-max replacements, and backward of ``mlm_weight * L_mlm / num_microbatches`` (the same
scaling the schedule gives D's loss), so G's gradient and its share of the embedding gradient
are in place before the schedule starts. It then broadcasts, per micro-batch, ``is_replaced``
and the MLM metrics over the pipeline group: the last stage needs ``is_replaced`` for the RTD
loss and adds the (detached) MLM loss to the reported total. Stage 0 keeps ``d_input`` (only it
embeds). Cost: stage 0 does G's work outside the 1F1B steady state (a longer warm-up bubble for
the other stages); running G inside stage 0's forward step is the alternative to measure.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.distributed as dist

StageSplit = list  # [((enc_start, enc_end), (dec_start, dec_end)), ...] one per stage


def validate_stage_split(split: Sequence, num_encoder_layers: int, num_decoder_layers: int) -> StageSplit:
    """Checks that the stages cover encoder then decoder layers contiguously, each stage non-empty."""
    split = [(tuple(e), tuple(d)) for e, d in split]
    enc_next = dec_next = 0
    for i, (e, d) in enumerate(split):
        if e[1] - e[0] + d[1] - d[0] <= 0:
            raise ValueError(f"pipeline stage {i} holds no layer: {split}")
        if e[1] > e[0]:
            if e[0] != enc_next or dec_next:
                raise ValueError(f"encoder layers of stage {i} are not contiguous: {split}")
            enc_next = e[1]
        if d[1] > d[0]:
            if d[0] != dec_next or enc_next != num_encoder_layers:
                raise ValueError(f"decoder layers of stage {i} start before the encoder ends or skip: {split}")
            dec_next = d[1]
    if enc_next != num_encoder_layers or dec_next != num_decoder_layers:
        raise ValueError(f"the split does not cover all layers: {split}")
    return split


def build_stage_modules(
    cfg,
    vocab_size: int,
    split: Optional[Sequence] = None,
    *,
    with_generator: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    recompute_granularity: Optional[str] = None,
):
    """(D stage, G or None, RTD head or None) for this pipeline rank: G on stage 0 (it shares
    the embedding there), the RTD head on the last stage. PP = 1 gives the whole model. Each
    stage builds only its own layers, with exactly the weights PP = 1 gives them (seeded per
    layer, :func:`spactor_mega.model.spactor.build_modules`)."""
    from megatron.core import parallel_state as ps

    from spactor_mega.model.spactor import build_modules

    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    m = cfg.model
    if split is None:
        from spactor_mega.parallel.layout import config_layout

        split = config_layout(cfg, vocab_size).stage_split()
    split = validate_stage_split(split, m.num_encoder_layers, m.num_decoder_layers)
    if len(split) != pp:
        raise ValueError(f"the stage split has {len(split)} stages but PP = {pp}")
    if with_generator is None:
        with_generator = cfg.spactor.tau > 0
    enc, dec = split[rank]
    d, g, rtd = build_modules(
        cfg, vocab_size, with_generator=with_generator, encoder_layers=enc, decoder_layers=dec,
        first_stage=rank == 0, last_stage=rank == pp - 1, params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization, recompute_granularity=recompute_granularity,
    )
    if d.config.pipeline_dtype is None:
        d.config.pipeline_dtype = params_dtype
    if pp > 1:
        sync_relative_bias(d)
    return d, g, rtd


def _bias_params(d) -> list:
    """[(encoder table or None), (decoder table or None)]: stages without a stack send zeros."""
    return [getattr(getattr(d, stack, None), "relative_attention_bias", None) for stack in ("encoder", "decoder")]


def _bias_shape(d) -> tuple:
    from megatron.core import parallel_state as ps

    heads = d.encoder_config.num_attention_heads // ps.get_tensor_model_parallel_world_size()
    return (d.model_cfg.relative_attention_num_buckets, heads)


def _sum_over_pipeline(d, tensors: list) -> list:
    """All-reduce (sum) each stack's table-shaped tensor over the pipeline group (zeros for a
    stage without that stack); returns the sums."""
    from megatron.core import parallel_state as ps

    shape = _bias_shape(d)
    ref = next(t for t in tensors if t is not None)
    flat = torch.cat([(t if t is not None else torch.zeros(shape, dtype=ref.dtype, device=ref.device)).reshape(-1)
                      for t in tensors]).contiguous()
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    n = shape[0] * shape[1]
    return [flat[i * n:(i + 1) * n].view(shape) for i in range(len(tensors))]


@torch.no_grad()
def sync_relative_bias(d) -> None:
    """Makes every stage's copy of a stack's bias table equal to the first holder's, and marks
    later copies ``shared`` (grad-norm counts one). Collective over the pipeline group."""
    biases = _bias_params(d)
    firsts = [d.encoder_layers[0] == 0, d.decoder_layers[0] == 0]
    sums = _sum_over_pipeline(d, [b.weight if (b is not None and f) else None if b is None else torch.zeros_like(b.weight)
                                   for b, f in zip(biases, firsts)])
    for b, f, s in zip(biases, firsts, sums):
        if b is not None:
            b.weight.copy_(s)
            b.weight.shared = not f


@torch.no_grad()
def allreduce_relative_bias_grads(d) -> None:
    """Sums the bias tables' gradients (DDP ``main_grad`` when present) over the pipeline group."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    grads = []
    for b in _bias_params(d):
        if b is None:
            grads.append(None)
            continue
        g = getattr(b.weight, "main_grad", None)
        if g is None:
            if b.weight.grad is None:
                b.weight.grad = torch.zeros_like(b.weight)
            g = b.weight.grad
        grads.append(g)
    if all(g is None for g in grads):
        grads[0] = torch.zeros(_bias_shape(d))
    sums = _sum_over_pipeline(d, grads)
    for g, s in zip(grads, sums):
        if g is not None:
            g.copy_(s)


def run_generator(objective, micro_batches: list, d, g, step: int, *, backward: bool = True,
                  grad_scale: Optional[float] = None, config=None) -> list:
    """Stage 0 runs G on every micro-batch (forward, sampling, and backward of its scaled MLM
    loss); every pipeline rank gets, per micro-batch, ``is_replaced`` and the MLM metrics.
    Returns one dict per micro-batch: ``is_replaced``, ``mlm_loss``, ``mlm_accuracy`` (floats
    as 0-d tensors) and on stage 0 ``d_input``. Collective over the pipeline group."""
    from megatron.core import parallel_state as ps

    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    n = len(micro_batches)
    scale = (1.0 / n) if grad_scale is None else grad_scale
    group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_first_rank()
    out = []
    for i, batch in enumerate(micro_batches):
        b, s = batch["enc_tokens"].shape
        buf = torch.zeros(b * s + 2, dtype=torch.float64)
        item = {}
        if first:
            gen = objective.generator_pass(batch, d, g, step, i)
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


def make_forward_step(objective, hybrid: bool, rtd_head=None, generated: Optional[list] = None):
    """The ``forward_step_func`` for Megatron's schedule: this stage's part of D; on the last
    stage D's losses (the returned loss excludes G's MLM term, already back-propagated by
    :func:`run_generator`; the reported ``loss`` includes it)."""
    from spactor_mega.model.spactor import unwrap

    counter = itertools.count()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        i = next(counter)
        d = unwrap(model)
        gen = generated[i] if hybrid else None
        tokens = None
        if d.pre_process:
            tokens = gen["d_input"] if hybrid else batch["enc_tokens"]
        out = d.stage_forward(tokens, batch["dec_input"], batch["enc_mask"])
        if not d.post_process:
            return out, _no_loss
        loss, metrics = objective.discriminator_losses(batch, d, unwrap(rtd_head), *out, gen if hybrid else None)

        def reduce(output_tensor):
            return output_tensor, {k: torch.as_tensor(v, dtype=torch.float64) for k, v in metrics.items()}

        return loss, reduce

    return forward_step


def _no_loss(output_tensor):  # never called: Megatron applies loss functions on the last stage only
    raise RuntimeError("loss function called on a non-last pipeline stage")


def pipeline_step(objective, micro_batches: list, d, g=None, rtd_head=None, *, hybrid: bool, step: int,
                  forward_only: bool = False, reduce_bias_grads: bool = True) -> dict:
    """One step of D's pipeline (and G before it on stage 0 in the hybrid stage): gradients
    accumulate in place (not stepped). Returns the micro-batch-averaged metrics on every rank
    (broadcast from the last stage). ``d`` may be wrapped (DDP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from spactor_mega.model.spactor import unwrap

    inner = unwrap(d)
    generated = None
    if hybrid:
        with torch.set_grad_enabled(not forward_only):
            generated = run_generator(objective, micro_batches, inner, unwrap(g), step,
                                      backward=not forward_only, config=inner.config)
    b, s_enc = micro_batches[0]["enc_tokens"].shape
    s_dec = micro_batches[0]["dec_input"].shape[1]
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(objective, hybrid, rtd_head, generated),
        data_iterator=iter(micro_batches),
        model=[d],
        num_microbatches=len(micro_batches),
        seq_length=s_enc + s_dec,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    if reduce_bias_grads and not forward_only:
        allreduce_relative_bias_grads(inner)
    metrics = [_average(outputs)] if ps.is_pipeline_last_stage(ignore_virtual=True) else [None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(metrics, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    return metrics[0]


def _average(outputs: list) -> dict:
    if not outputs:
        return {}
    return {k: float(sum(float(o[k]) for o in outputs) / len(outputs)) for k in outputs[0]}
