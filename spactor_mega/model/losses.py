"""Loss terms of SpacTor, reduced the way the step function reports them.

Vocab-parallel cross entropy is Megatron's ``tensor_parallel.vocab_parallel_cross_entropy``
(fp32 softmax over the TP-sharded vocabulary; note it overwrites its input logits in place, so
anything else that reads them - sampling, argmax accuracy - must run first). Everything else is
plain torch on tensors that are replicated over TP, so every TP rank computes the same values.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from spactor_mega.parallel import collectives


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights) / max(sum(weights), 1)`` (fp32)."""
    weights = weights.to(torch.float32)
    return (values.float() * weights).sum() / weights.sum().clamp(min=1.0)


def vocab_parallel_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE ``[...]`` from vocab-parallel ``logits`` ``[..., V/tp]`` (consumes the logits)."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


_INT64_MAX = torch.iinfo(torch.int64).max


def vocab_range(local_vocab: int) -> tuple[int, int]:
    """This TP rank's [start, end) of the global vocabulary for a shard of ``local_vocab`` rows."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    return rank * local_vocab, (rank + 1) * local_vocab


@torch.no_grad()
def vocab_parallel_argmax(scores: torch.Tensor, vocab_start: Optional[int] = None) -> torch.Tensor:
    """Global argmax (smallest id on ties) over a vocab-parallel last dim; ``[..., V/tp]`` -> ``[...]``."""
    if vocab_start is None:
        vocab_start = vocab_range(scores.size(-1))[0]
    local_max, local_arg = scores.max(dim=-1)
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return local_arg
    global_max = local_max.clone()
    collectives.all_reduce_(global_max, op=collectives.ReduceOp.MAX, group=group)
    cand = torch.where(local_max == global_max, local_arg + vocab_start, torch.full_like(local_arg, _INT64_MAX))
    collectives.all_reduce_(cand, op=collectives.ReduceOp.MIN, group=group)
    return cand


def vocab_parallel_target_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits[..., target]`` from a vocab-parallel last dim, differentiable: ``[..., V/tp]``,
    ``[...]`` -> ``[...]`` (fp32). Each rank gathers the targets in its shard (0 elsewhere) and
    ``reduce_from_tensor_model_parallel_region`` sums them (identity backward). Saves no logits for
    backward, so Megatron's cross entropy may overwrite them afterwards."""
    start, end = vocab_range(logits.size(-1))
    outside = (targets < start) | (targets >= end)
    local = torch.where(outside, 0, targets - start).view(-1)
    # indexing, as Megatron's CE does: its backward keeps the indices only (gather's keeps the logits)
    rows = torch.arange(local.numel(), device=logits.device)
    picked = logits.reshape(-1, logits.size(-1))[rows, local].view_as(targets).float().masked_fill(outside, 0.0)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(picked)


def sc_loss(
    lm_logits_sbv: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Span-corruption loss: mean CE over target tokens, and (``z_loss`` > 0) T5X's auxiliary
    ``z_loss * mean(log Z^2)`` over the same tokens (None otherwise), which keeps the softmax
    normaliser near 1 (T5X's default coefficient is 1e-4). Logits ``[s_dec, b, V/tp]`` (Megatron
    layout), labels / mask batch-first ``[b, s_dec]``. Logits for more positions than there are
    labels (a decoder padded for sequence parallelism) score only the labelled ones."""
    pad = lm_logits_sbv.size(0) - labels.size(1)
    if pad:  # padding the labels costs less than slicing (copying) the logits
        labels, loss_mask = F.pad(labels, (0, pad)), F.pad(loss_mask, (0, pad))
    mask, targets = loss_mask.transpose(0, 1), labels.transpose(0, 1).contiguous()
    # log Z = CE + the target's logit, gradients included (softmax = (softmax - onehot) + onehot): the
    # z-loss reuses the fp32 softmax Megatron's CE keeps, where a logsumexp of its own would keep another
    # logits-sized fp32 buffer and, CE overwriting fp32 logits in place, a copy of the logits.
    target_logit = vocab_parallel_target_logit(lm_logits_sbv, targets) if z_loss > 0 else None  # before CE
    ce = vocab_parallel_ce(lm_logits_sbv, targets)  # [s, b]
    z_term = z_loss * masked_mean((ce + target_logit) ** 2, mask) if z_loss > 0 else None
    return masked_mean(ce, mask), z_term


@torch.no_grad()
def sc_accuracy(lm_logits_sbv: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of SC target tokens D's greedy prediction gets right (the study's second quality
    curve beside the loss). Same layouts as :func:`sc_loss`; must run before it (its CE consumes
    the logits)."""
    predicted = vocab_parallel_argmax(lm_logits_sbv[: labels.size(1)].detach())  # [s, b]
    return masked_mean((predicted == labels.transpose(0, 1)).float(), loss_mask.transpose(0, 1))


def rtd_loss(rtd_logits: torch.Tensor, is_replaced: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the real (non-pad) encoder tokens, mean over them. All ``[b, s]``."""
    bce = F.binary_cross_entropy_with_logits(rtd_logits.float(), is_replaced.float(), reduction="none")
    return masked_mean(bce, enc_mask)


@torch.no_grad()
def rtd_stats(rtd_logits: torch.Tensor, is_replaced: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
    """[accuracy, precision, recall, replaced fraction] as one fp32 tensor (0 when undefined)."""
    real = enc_mask.bool()
    pred = (rtd_logits > 0) & real
    truth = is_replaced.bool() & real
    n_real = real.sum().clamp(min=1).float()
    correct = ((pred == truth) & real).sum().float()
    tp = (pred & truth).sum().float()
    n_pred, n_true = pred.sum().float(), truth.sum().float()
    return torch.stack(
        [
            correct / n_real,
            torch.where(n_pred > 0, tp / n_pred.clamp(min=1), torch.zeros_like(tp)),
            torch.where(n_true > 0, tp / n_true.clamp(min=1), torch.zeros_like(tp)),
            n_true / n_real,
        ]
    )
