"""Building this rank's modules: D (its pipeline stage, or its chunks with virtual stages), G on
the first stage and the RTD head on the last; and keeping the relative-position bias tables that
several stages hold equal.

Stage split: a list with one ``(encoder_layers, decoder_layers)`` pair of global ``[start, end)``
ranges per stage; by default the config's pipeline layout
(:func:`spactor_mega.plan.layout.config_layout`: ``parallel.pipeline_layout`` or the
FLOPs-balanced split, validated there). A stage may hold the end of the encoder and the start of
the decoder. With virtual stages (``parallel.virtual_pipeline_model_parallel_size`` V > 1) the
split has ``PP * V`` stages in virtual order and each rank builds V chunks
(:func:`build_stage_chunks`: rank ``r`` holds virtual stages ``r, r + PP, ...``). Virtual stage 0
holds the embedding and G, the last the heads.

A tied LM head (``model.tie_word_embeddings``) under PP > 1 is a copy of the embedding on the
last stage: drawn equal (:mod:`spactor_mega.model.init`), loaded equal (its checkpoint entry is a
replica of the embedding's) and kept equal by :func:`allreduce_tied_head_grads`, which sums the
two gradients over Megatron's embedding group (the first and last pipeline ranks), as Megatron's
``finalize_model_grads`` does for tied output layers: ours, because the engine finalises each chunk
(and G, and the RTD head) on its own, while Megatron's needs all of a rank's D chunks in one call.

Relative-position bias tables are replicated on every stage (chunk) holding layers of that
stack: equal at build time (:func:`sync_relative_bias`, an all-reduce over the pipeline group in
which chunks other than the stack's first holder send zeros) and kept equal by summing their
gradients over this rank's chunks and the same group after the schedule
(:func:`allreduce_relative_bias_grads`, as Megatron does for shared embeddings, and, like them,
in a gradient bucket of their own, which the distributed optimizer needs). Copies on later
stages are marked ``shared`` so the grad-norm counts them once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from spactor_mega.curriculum import tau_bound
from spactor_mega.parallel import collectives
from spactor_mega.plan.derived import generator_num_layers
from spactor_mega.plan.layout import config_layout

from .generator import T5Generator
from .heads import RTDHead
from .t5 import T5Discriminator


def build_spactor_modules(
    cfg,
    vocab_size: int,
    *,
    with_generator: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    stage_split: Optional[Sequence] = None,
):
    """(D, G or None, RTD head or None) for ``cfg`` (a :class:`spactor_mega.config.Config`).

    ``with_generator`` defaults to ``tau > 0`` (tau auto: its bound). With PP > 1 this rank's pipeline
    stage (:func:`build_stage_chunks`: G on stage 0, the RTD head
    on the last stage, None elsewhere) of ``stage_split`` (default: the config's layout); with
    virtual stages (V > 1) D is this rank's list of V chunks.
    Call after ``initialize_parallel``; the weights depend on ``cfg.train.seed`` only, not on
    the layout (see :func:`build_modules`).
    """
    if with_generator is None:
        with_generator = tau_bound(cfg.spactor) > 0
    if ps.get_pipeline_model_parallel_world_size() > 1:
        chunks, g, rtd = build_stage_chunks(
            cfg, vocab_size, stage_split, with_generator=with_generator, params_dtype=params_dtype,
            use_cpu_initialization=use_cpu_initialization,
        )
        return (chunks[0] if len(chunks) == 1 else chunks), g, rtd
    return build_modules(
        cfg, vocab_size, with_generator=with_generator, params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
    )


def build_modules(
    cfg,
    vocab_size: int,
    *,
    with_generator: bool,
    encoder_layers: Optional[tuple[int, int]] = None,
    decoder_layers: Optional[tuple[int, int]] = None,
    first_stage: bool = True,
    last_stage: bool = True,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
):
    """D (the given global layer ranges; all by default), G on the first stage and the RTD
    head on the last (when ``with_generator``). Every weight is drawn by ``cfg.model.init`` from
    ``cfg.train.seed``, its part, its global layer index and its name
    (:mod:`spactor_mega.model.init`), so any TP/PP layout starts from the one-stage model's weights."""
    common = dict(
        params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
    )
    seed = cfg.train.seed
    d = T5Discriminator(cfg.model, vocab_size, pre_process=first_stage, post_process=last_stage,
                        encoder_layers=encoder_layers, decoder_layers=decoder_layers, init_seed=seed,
                        sequence_parallel=cfg.parallel.sequence_parallel, **common)
    g = rtd = None
    if with_generator and first_stage:
        g = T5Generator(cfg.model, cfg.generator, generator_num_layers(cfg), d.embedding, init_seed=seed, **common)
    if with_generator and last_stage:
        rtd = RTDHead(d.encoder_config, init_scheme=cfg.model.init, init_seed=seed)
    return d, g, rtd


def virtual_pipeline_size() -> int:
    """V: the number of model chunks (virtual stages) each pipeline rank holds (1 = none)."""
    return ps.get_virtual_pipeline_model_parallel_world_size() or 1


def build_stage_chunks(
    cfg,
    vocab_size: int,
    split: Optional[Sequence] = None,
    *,
    with_generator: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
):
    """([D chunk per virtual stage], G or None, RTD head or None) for this pipeline rank.

    The split has ``PP * V`` stages in virtual order: rank ``r`` holds virtual stages ``r, r + PP,
    r + 2 PP, ...`` (Megatron's interleaved assignment), chunk ``c`` being virtual stage
    ``c * PP + r``. G lives with virtual stage 0 (it shares the embedding), the RTD head with the
    last. Each chunk builds only its own layers, with exactly the weights PP = 1 gives them
    (drawn per tensor, :func:`build_modules`)."""
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vp = virtual_pipeline_size()
    if split is None:
        split = config_layout(cfg, vocab_size).stage_split()
    split = [(tuple(e), tuple(d)) for e, d in split]
    if len(split) != pp * vp:
        raise ValueError(f"the stage split has {len(split)} stages but PP x V = {pp} x {vp}")
    if with_generator is None:
        with_generator = tau_bound(cfg.spactor) > 0
    chunks, g, rtd = [], None, None
    for chunk in range(vp):
        stage = chunk * pp + rank
        enc, dec = split[stage]
        d, g_here, rtd_here = build_modules(
            cfg, vocab_size, with_generator=with_generator, encoder_layers=enc, decoder_layers=dec,
            first_stage=stage == 0, last_stage=stage == len(split) - 1, params_dtype=params_dtype,
            use_cpu_initialization=use_cpu_initialization,
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
    heads = d.encoder_config.num_attention_heads // ps.get_tensor_model_parallel_world_size()
    return (d.model_cfg.relative_attention_num_buckets, heads)


def _sum_over_pipeline(chunks: list, per_chunk: list) -> list:
    """Sums, over this rank's chunks and then the pipeline group, each stack's table-shaped
    tensor (``per_chunk``: one [encoder, decoder] pair per chunk, None where the chunk lacks the
    stack); returns the two sums."""
    shape = _bias_shape(chunks[0])
    n = shape[0] * shape[1]
    ref = next((b.weight for c in chunks for b in _bias_params(c) if b is not None), None)
    if ref is None:  # UMT5's per-layer tables: no stack tables anywhere (every rank alike)
        return [None, None]
    flat = torch.zeros(2 * n, dtype=ref.dtype, device=ref.device)
    for pair in per_chunk:
        for i, t in enumerate(pair):
            if t is not None:
                flat[i * n:(i + 1) * n] += t.reshape(-1)
    collectives.all_reduce_(flat, group=ps.get_pipeline_model_parallel_group())
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
                # Megatron's DDP gives a "shared_embedding" its own bucket under the distributed
                # optimizer, so every stage's copy is cut into the same DP shards: each rank's shard
                # of the reduce-scattered gradient, all it steps, is then summed over the stages
                # with the same shard of the other copies (allreduce_relative_bias_grads).
                b.weight.shared_embedding = True


@torch.no_grad()
def allreduce_relative_bias_grads(d) -> None:
    """Sums the bias tables' gradients (DDP ``main_grad`` when present) over every chunk of
    every pipeline rank and writes the sum back into each copy. ``d``: a chunk or a list."""
    chunks = as_chunks(d)
    if ps.get_pipeline_model_parallel_world_size() == 1 and len(chunks) == 1:
        return
    pairs = [[None if b is None else _grad_buffer(b.weight) for b in _bias_params(c)] for c in chunks]
    sums = _sum_over_pipeline(chunks, pairs)
    for grads in pairs:
        for g, s in zip(grads, sums):
            if g is not None:
                g.copy_(s)


def _grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The gradient Megatron's DDP accumulates (``main_grad``), else ``.grad`` (zeros if none yet)."""
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    return grad


@torch.no_grad()
def allreduce_tied_head_grads(d) -> None:
    """With a tied LM head under PP > 1: sums the gradients of the embedding (first stage) and of
    the last stage's copy over the embedding group and writes the sum into both. ``d``: a chunk or
    this rank's list of chunks; a no-op without a tied head or without a pipeline."""
    chunks = as_chunks(d)
    if not chunks[0].tied_head or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    for c in chunks:
        if c.pre_process or c.post_process:
            collectives.all_reduce_(_grad_buffer(c.shared_embedding_or_output_weight()), group=ps.get_embedding_group())


def allreduce_shared_grads(d) -> None:
    """Sums the gradients of every tensor several pipeline stages hold (the stacks' bias tables, a
    tied head's copy of the embedding), after the schedule's backward. ``d``: a chunk or a list."""
    allreduce_relative_bias_grads(d)
    allreduce_tied_head_grads(d)
