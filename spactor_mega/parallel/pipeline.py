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

Virtual stages (``parallel.virtual_pipeline_model_parallel_size`` V > 1): the split has
``PP * V`` stages in virtual order and each rank builds V chunks (:func:`build_stage_chunks`:
rank ``r`` holds virtual stages ``r, r + PP, ...``); the same packed tensor goes through
Megatron's interleaved schedule with one data iterator per chunk (each yields ``(micro-batch
index, batch)``). Virtual stage 0 holds the embedding and G, the last the heads and losses.

Relative-position bias tables are replicated on every stage (chunk) holding layers of that stack: equal
at build time (:func:`sync_relative_bias`, an all-reduce over the pipeline group in which
chunks other than the stack's first holder send zeros) and kept equal by summing their gradients
over this rank's chunks and the same group after the schedule (:func:`allreduce_relative_bias_grads`, as Megatron does for shared
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


def build_stage_modules(cfg, vocab_size: int, split: Optional[Sequence] = None, **kwargs):
    """(D stage, G or None, RTD head or None) for this pipeline rank without virtual stages
    (:func:`build_stage_chunks` with one chunk)."""
    chunks, g, rtd = build_stage_chunks(cfg, vocab_size, split, **kwargs)
    if len(chunks) != 1:
        raise ValueError(f"this rank holds {len(chunks)} virtual stages; use build_stage_chunks")
    return chunks[0], g, rtd


def virtual_pipeline_size() -> int:
    """V: the number of model chunks (virtual stages) each pipeline rank holds (1 = none)."""
    from megatron.core import parallel_state as ps

    return ps.get_virtual_pipeline_model_parallel_world_size() or 1


def build_stage_chunks(
    cfg,
    vocab_size: int,
    split: Optional[Sequence] = None,
    *,
    with_generator: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    recompute_granularity: Optional[str] = None,
):
    """([D chunk per virtual stage], G or None, RTD head or None) for this pipeline rank.

    The split has ``PP * V`` stages in virtual order: rank ``r`` holds virtual stages ``r, r + PP,
    r + 2 PP, ...`` (Megatron's interleaved assignment), chunk ``c`` being virtual stage
    ``c * PP + r``. G lives with virtual stage 0 (it shares the embedding), the RTD head with the
    last. Each chunk builds only its own layers, with exactly the weights PP = 1 gives them
    (seeded per layer, :func:`spactor_mega.model.spactor.build_modules`)."""
    from megatron.core import parallel_state as ps

    from spactor_mega.model.spactor import build_modules

    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vp = virtual_pipeline_size()
    m = cfg.model
    if split is None:
        from spactor_mega.parallel.layout import config_layout

        split = config_layout(cfg, vocab_size).stage_split()
    split = validate_stage_split(split, m.num_encoder_layers, m.num_decoder_layers)
    if len(split) != pp * vp:
        raise ValueError(f"the stage split has {len(split)} stages but PP x V = {pp} x {vp}")
    if with_generator is None:
        with_generator = cfg.spactor.tau > 0
    chunks, g, rtd = [], None, None
    for chunk in range(vp):
        stage = chunk * pp + rank
        enc, dec = split[stage]
        d, g_here, rtd_here = build_modules(
            cfg, vocab_size, with_generator=with_generator, encoder_layers=enc, decoder_layers=dec,
            first_stage=stage == 0, last_stage=stage == len(split) - 1, params_dtype=params_dtype,
            use_cpu_initialization=use_cpu_initialization, recompute_granularity=recompute_granularity,
        )
        if d.config.pipeline_dtype is None:
            d.config.pipeline_dtype = params_dtype
        if vp > 1:
            # Read by the interleaved schedule from the first chunk's config; our layer configs
            # keep pipeline_model_parallel_size = 1, so its default group size (PP) is set here.
            d.config.virtual_pipeline_model_parallel_size = vp
            d.config.microbatch_group_size_per_vp_stage = pp
            # Interleaving sends both ways at once; with PP = 2 both peers are the same rank, and
            # batched gloo p2p (all tag 0) then pairs an activation with a gradient (measured:
            # wrong losses). Megatron's unbatched path orders them by even/odd rank.
            d.config.batch_p2p_comm = False
        chunks.append(d)
        g, rtd = g or g_here, rtd or rtd_here
    if pp > 1:
        sync_relative_bias(chunks)
    return chunks, g, rtd


def as_chunks(d) -> list:
    """A D stage as this rank's list of chunks (one, or V with virtual stages)."""
    return list(d) if isinstance(d, (list, tuple)) else [d]


def _bias_params(d) -> list:
    """[(encoder table or None), (decoder table or None)] of one chunk."""
    return [getattr(getattr(d, stack, None), "relative_attention_bias", None) for stack in ("encoder", "decoder")]


def _bias_shape(d) -> tuple:
    from megatron.core import parallel_state as ps

    heads = d.encoder_config.num_attention_heads // ps.get_tensor_model_parallel_world_size()
    return (d.model_cfg.relative_attention_num_buckets, heads)


def _sum_over_pipeline(chunks: list, per_chunk: list) -> list:
    """Sums, over this rank's chunks and then the pipeline group, each stack's table-shaped
    tensor (``per_chunk``: one [encoder, decoder] pair per chunk, None where the chunk lacks the
    stack); returns the two sums."""
    from megatron.core import parallel_state as ps

    shape = _bias_shape(chunks[0])
    n = shape[0] * shape[1]
    ref = next(b.weight for c in chunks for b in _bias_params(c) if b is not None)  # every chunk holds a stack
    flat = torch.zeros(2 * n, dtype=ref.dtype, device=ref.device)
    for pair in per_chunk:
        for i, t in enumerate(pair):
            if t is not None:
                flat[i * n:(i + 1) * n] += t.reshape(-1)
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    return [flat[i * n:(i + 1) * n].view(shape) for i in range(2)]


@torch.no_grad()
def sync_relative_bias(d) -> None:
    """Makes every chunk's copy of a stack's bias table equal to the first holder's (the chunk
    holding that stack's layer 0), and marks the other copies ``shared`` (grad-norm counts one).
    ``d``: a chunk or this rank's list of chunks. Collective over the pipeline group."""
    chunks = as_chunks(d)
    pairs = []
    for c in chunks:
        firsts = (c.encoder_layers[0] == 0, c.decoder_layers[0] == 0)
        pairs.append([b.weight if (b is not None and f) else None for b, f in zip(_bias_params(c), firsts)])
    sums = _sum_over_pipeline(chunks, pairs)
    for c in chunks:
        firsts = (c.encoder_layers[0] == 0, c.decoder_layers[0] == 0)
        for b, f, s in zip(_bias_params(c), firsts, sums):
            if b is not None:
                b.weight.copy_(s)
                b.weight.shared = not f


@torch.no_grad()
def allreduce_relative_bias_grads(d) -> None:
    """Sums the bias tables' gradients (DDP ``main_grad`` when present) over every chunk of
    every pipeline rank and writes the sum back into each copy. ``d``: a chunk or a list."""
    from megatron.core import parallel_state as ps

    chunks = as_chunks(d)
    if ps.get_pipeline_model_parallel_world_size() == 1 and len(chunks) == 1:
        return
    pairs = []
    for c in chunks:
        grads = []
        for b in _bias_params(c):
            if b is None:
                grads.append(None)
                continue
            g = getattr(b.weight, "main_grad", None)
            if g is None:
                if b.weight.grad is None:
                    b.weight.grad = torch.zeros_like(b.weight)
                g = b.weight.grad
            grads.append(g)
        pairs.append(grads)
    sums = _sum_over_pipeline(chunks, pairs)
    for grads in pairs:
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
    """The ``forward_step_func`` for Megatron's schedule: this stage's (chunk's) part of D; on
    the last stage D's losses (the returned loss excludes G's MLM term, already back-propagated
    by :func:`run_generator`; the reported ``loss`` includes it). The data iterator yields
    ``(micro-batch index, batch)``: with virtual stages each chunk reads its own iterator."""
    from spactor_mega.model.spactor import unwrap

    def forward_step(data_iterator, model):
        i, batch = next(data_iterator)
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


def check_microbatch_count(num_microbatches: int, pp: int, vp: int) -> None:
    """Megatron's interleaved schedule runs micro-batches in groups of PP per virtual stage."""
    if vp > 1 and (num_microbatches < pp or num_microbatches % pp):
        raise ValueError(f"{num_microbatches} micro-batches with virtual pipeline stages need a multiple of "
                         f"the pipeline size {pp} (Megatron's interleaved schedule)")


def pipeline_step(objective, micro_batches: list, d, g=None, rtd_head=None, *, hybrid: bool, step: int,
                  forward_only: bool = False, reduce_bias_grads: bool = True) -> dict:
    """One step of D's pipeline (and G before it on stage 0 in the hybrid stage): gradients
    accumulate in place (not stepped). Returns the micro-batch-averaged metrics on every rank
    (broadcast from the last stage). ``d``: this rank's D stage, or its list of chunks (virtual
    stages, Megatron's interleaved schedule); either may be wrapped (DDP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from spactor_mega.model.spactor import unwrap

    chunks = as_chunks(d)
    inner = [unwrap(c) for c in chunks]
    check_microbatch_count(len(micro_batches), ps.get_pipeline_model_parallel_world_size(), len(chunks))
    generated = None
    if hybrid:
        with torch.set_grad_enabled(not forward_only):
            generated = run_generator(objective, micro_batches, inner[0], unwrap(g), step,
                                      backward=not forward_only, config=inner[0].config)
    b, s_enc = micro_batches[0]["enc_tokens"].shape
    s_dec = micro_batches[0]["dec_input"].shape[1]
    iterators = [iter(list(enumerate(micro_batches))) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(objective, hybrid, rtd_head, generated),
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


def average_metrics(outputs: list) -> dict:
    """The per-micro-batch metric dicts a schedule returns, averaged (floats)."""
    if not outputs:
        return {}
    return {k: float(sum(float(o[k]) for o in outputs) / len(outputs)) for k in outputs[0]}
