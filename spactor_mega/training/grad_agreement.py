"""Gradient agreement of the hybrid objective (issue #22, signal 3): the cosine between the gradient
of D's span-corruption loss and that of the auxiliary loss, on the parameters of D both reach
(Du et al. 2018, "Adapting auxiliary losses using gradient similarity").

Definition. On one micro-batch, ``cos = <g_sc, g_aux> / (|g_sc| |g_aux|)``, where ``g_sc`` is the
gradient of D's span-corruption loss ``L_sc`` (with ``spactor.z_loss`` > 0 plus the z-loss on D's
LM logits: training back-propagates the two as one SC term) and ``g_aux`` the gradient of
``w_rtd * L_rtd + w_mlm * L_mlm`` (``spactor.rtd_weight``, ``spactor.mlm_weight``), both with
respect to :func:`shared_parameters`: D's token embedding (the SC loss reaches it through the
encoder and decoder inputs and a tied LM head, the RTD loss through the encoder input, the MLM loss
through G, which reads it and ties its MLM head to it) and D's encoder (its layers, its relative
bias table(s), its final norm). Left out: the decoder and an untied LM head, which get no auxiliary
gradient, and G's and the RTD head's parameters, which get no SC gradient; their entries would be
zero in one of the two vectors and only add to the other's norm, pulling the cosine towards 0 by
the size of those parts instead of by agreement.

The value is the cosine of the FULL gradients, the same under any layout: dot product and squared
norms are float64 sums over this rank's tensors and then over the model-parallel ranks (TP, PP):
a TP-split tensor counts per shard; a tensor replicated over TP counts once (TP rank 0); a
sequence-parallel norm weight, whose per-rank gradient is partial, is summed over TP first; the
relative-bias copies that several pipeline stages hold, and a tied LM head's last-stage copy of
the embedding, are summed into each copy first (:func:`~spactor_mega.model.stages.allreduce_shared_grads`,
as training does) and counted once (bias copies marked ``shared`` are skipped; the head's copy,
named ``lm_head.``, is not in the set: its SC gradient reaches the embedding's). The micro-batch is one
FIXED micro-batch the caller passes, identical on every rank (e.g. the first validation
micro-batch), so there is nothing to average over DP: only the first DP replica computes, and one
all-reduce over the world hands its value to every rank, bitwise the same everywhere. The modules
run in eval mode (no dropout: dropout masks differ between TP layouts, and would make the cosine a
function of one draw of them); G's replacements come from the samples' own keys, so the value is a
function of the weights and the micro-batch only. NaN when either gradient is zero, and under
DeepSpeed's ZeRO-3 (its parameters are partitioned outside the engine's forward; the engine says so once).

Cost, per measurement: the two losses each take one forward and one backward of the whole hybrid
step on the micro-batch (the pipeline schedule back-propagates one loss per run): ``2 x`` the
hybrid step's training FLOPs per sample (``StepFlops.hybrid``, forward + backward) ``x`` the
micro-batch size (``x PP`` with virtual pipeline stages, whose schedule needs PP micro-batches: PP
copies of it), once in the whole run (the other DP replicas wait at the final all-reduce):
:func:`spactor_mega.plan.flops.gradient_cosine_flops`, exact for the Megatron engine (counted by
the test), an upper bound for DeepSpeed's ``torch.autograd.grad``. Memory: a
copy of this rank's ``g_sc`` for the included tensors (fp32 under Megatron's fp32 gradient
buffers), freed when the measurement returns, on top of one micro-batch's activations.

Training is untouched: the gradients are read from Megatron DDP's ``main_grad`` buffers with their
data-parallel reduction off (``no_sync``, no ``finalize_model_grads``) and the buffers zeroed after,
or taken with ``torch.autograd.grad`` (DeepSpeed), which leaves ``.grad`` and ZeRO's hooks alone;
no optimizer is called; torch's CPU/CUDA RNG states and Megatron's RNG-tracker states are restored
(:func:`preserved_rng`). A run that measures has bitwise the losses of one that does not
(tests/training/test_grad_agreement.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from spactor_mega.curriculum import Phase
from spactor_mega.model.spactor import SpactorObjective, unwrap
from spactor_mega.parallel import collectives
from spactor_mega.parallel.tensor_shards import tp_attributes
from spactor_mega.training.engines.base import eval_mode
from spactor_mega.training.pipeline_step import pipeline_step

# D's parameters both losses reach, by name prefix (see the module docstring)
SHARED_PREFIXES = ("embedding.", "encoder.")


def shared_parameters(d) -> list[torch.nn.Parameter]:
    """The parameters of D (a stage or chunk, possibly wrapped) in the agreement: its embedding and encoder."""
    return [p for name, p in unwrap(d).named_parameters() if name.startswith(SHARED_PREFIXES)]


def one_sided(objective: SpactorObjective) -> tuple[SpactorObjective, SpactorObjective]:
    """(SC loss alone, auxiliary loss alone): the objective with the other side's weights at 0."""
    return (dataclasses.replace(objective, mlm_weight=0.0, rtd_weight=0.0),
            dataclasses.replace(objective, sc_weight=0.0))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """torch's CPU and CUDA RNG states and Megatron's RNG-tracker states as they were before the block."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracked = {name: state.clone() if torch.is_tensor(state) else state
               for name, state in tracker.get_states().items()}
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


def _measures() -> bool:
    """Only the first DP replica computes (the micro-batch is the same on all of them)."""
    return ps.get_data_parallel_rank() == 0


def _agreement_sums(params: list, sc: list, aux: list, device: torch.device) -> torch.Tensor:
    """``[<g_sc, g_aux>, |g_sc|^2, |g_aux|^2]`` (float64) of this rank's part of the full gradients."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sc = [torch.zeros_like(p) if g is None else g for p, g in zip(params, sc)]
    aux = [torch.zeros_like(p) if g is None else g for p, g in zip(params, aux)]
    partial = [i for i, p in enumerate(params) if tp > 1 and getattr(p, "sequence_parallel", False)]
    if partial:  # sequence-parallel norm weights: each TP rank holds its sequence shard's part
        flat = torch.cat([g[i].reshape(-1).double() for g in (sc, aux) for i in partial])
        collectives.all_reduce_(flat, group=ps.get_tensor_model_parallel_group())
        for g, part in zip((sc, aux), flat.chunk(2)):
            for i, piece in zip(partial, part.split([params[i].numel() for i in partial])):
                g[i] = piece
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for p, a, b in zip(params, sc, aux, strict=True):
        if getattr(p, "shared", False):  # a copy whose (summed) gradient the first holder counts
            continue
        if not tp_attributes(p)[0] and tp_rank != 0:  # whole on every TP rank: counted once
            continue
        a, b = a.double(), b.double()
        sums += torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])
    return sums


def _cosine(sums: torch.Tensor) -> float:
    """The world's sum of ``sums`` (only the first DP replica's are non-zero) as one cosine."""
    dot, sc, aux = collectives.all_reduce_(sums).tolist()
    return dot / math.sqrt(sc * aux) if sc > 0 and aux > 0 else math.nan


def pipeline_gradient_cosine(objective: SpactorObjective, micro_batch: dict, chunks: list, g, rtd_head,
                             models: list) -> float:
    """The cosine through Megatron's schedule (any TP, PP, virtual stages): one run per loss on
    ``micro_batch``, the gradients read from the DDP buffers. ``chunks``: this rank's D chunks, DDP
    wrapped; ``g``/``rtd_head``: G's and the RTD head's DDP (None on stages without them);
    ``models``: every DDP of the engine (their buffers are zeroed). Collective over the world."""
    device = next(unwrap(chunks[0]).parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if _measures():
        config = chunks[0].config  # the schedule's: its DP reduction hooks are off for the measurement
        hooks = config.no_sync_func, config.finalize_model_grads_func
        config.no_sync_func = config.finalize_model_grads_func = None
        params = [p for c in chunks for p in shared_parameters(c)]
        # Megatron's interleaved schedule (virtual stages) needs PP micro-batches: the mean gradient
        # of PP copies of the micro-batch is its gradient
        copies = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
        try:
            with torch.enable_grad(), eval_mode(models), preserved_rng():
                grads = []
                for side in one_sided(objective):
                    for model in models:
                        model.zero_grad_buffer()  # (which also ends a no_sync: entered after it)
                    with contextlib.ExitStack() as no_sync:
                        for model in models:
                            no_sync.enter_context(model.no_sync())
                        # sums the gradients of the tensors several stages hold (bias tables, a tied head)
                        pipeline_step(side, [micro_batch] * copies, chunks, g, rtd_head, phase=Phase.HYBRID)
                    grads.append([p.main_grad.clone() if not grads else p.main_grad for p in params])
                sums = _agreement_sums(params, *grads, device)
        finally:
            config.no_sync_func, config.finalize_model_grads_func = hooks
            for model in models:
                model.zero_grad_buffer()
    return _cosine(sums)


def autograd_gradient_cosine(objective: SpactorObjective, micro_batch: dict, d, g, rtd_head) -> float:
    """The cosine by ``torch.autograd.grad`` on whole modules (PP = 1; TP any): one forward and one
    backward per loss; nothing is accumulated into ``.grad``. Collective over the world."""
    d, g, rtd_head = unwrap(d), unwrap(g), unwrap(rtd_head)
    params = shared_parameters(d)
    sums = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    if _measures():
        with torch.enable_grad(), eval_mode([d, g, rtd_head]), preserved_rng():
            grads = []
            for side in one_sided(objective):
                loss, _ = side(micro_batch, d, g, rtd_head, phase=Phase.HYBRID)
                grads.append(torch.autograd.grad(loss, params, allow_unused=True))
        sums = _agreement_sums(params, *grads, params[0].device)
    return _cosine(sums)
