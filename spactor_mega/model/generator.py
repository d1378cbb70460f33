"""The generator G and vocab-parallel Gumbel-max sampling.

G is an encoder-only T5 stack: the same Megatron ``TransformerLayer`` spec as D's encoder, its own
relative position bias (bidirectional) and final RMSNorm, width ``d_model`` of D, depth
``generator_num_layers(cfg)``, ``d_ff``/heads from ``GeneratorConfig`` (None: D's), ``d_kv`` of D.
It reads D's token embedding (passed in, *not* registered as a submodule, so G's state dict, DDP
buckets and optimizer never hold it: the gradient G sends into it lands in D's DDP buffer through
the hook D's DDP put on that parameter) and its MLM head is tied to it (vocab-parallel logits).

G's layers are not tensor-split: they are Megatron layers built with a TP-size-1 config and a
process group holding only this rank (:func:`spactor_mega.parallel.state.self_group`). Today every
TP rank runs G on all rows (identical work, identical gradients, so no TP reduction of G's grads
is needed). Only the part between the embedding lookup and the vocab-parallel head is row-local
(:meth:`T5Generator._local_rows` / :meth:`_gather_rows`), which is where [3/5] can give each TP
rank a share of the rows (G's DDP would then reduce over TP x DP).

Sampling (:func:`gumbel_max_sample`): ``argmax(logit / T + g)`` with Gumbel noise ``g`` drawn for
the *full* padded vocabulary from a generator seeded by a key (seed, step, micro-batch, DP rank)
and sliced to this rank's shard, so TP=1 and TP=k draw identical samples. Each rank takes its
local max, the max is all-reduced (MAX) over TP and the smallest global id reaching it wins (MIN):
the same tie-break as ``torch.argmax``. Ids outside ``[0, sample_vocab_size)`` (padded rows, and
for a T5 vocabulary the sentinels and the mask token, which sit above the SentencePiece ids) and
``forbidden_ids`` (pad, EOS) are never sampled.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from ..parallel.state import self_group
from .heads import MLMHead
from .spec import t5_encoder_layer_spec, t5_transformer_config
from .t5 import T5Stack, padding_mask_or_none


def generator_process_groups() -> ProcessGroupCollection:
    """Megatron's groups, except TP = this rank alone (G is built as if TP were 1).

    All groups are pulled (newer Megatron layers read more of them); ``tp_cp`` becomes the
    singleton too (context parallelism is not supported by our attention, so cp = 1).
    """
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.tp = self_group()
    pgs.tp_cp = pgs.tp
    return pgs


class T5Generator(MegatronModule):
    """G: ``tokens [b, s]`` -> vocab-parallel MLM logits at ``positions`` ``[b, m, V/tp]``."""

    def __init__(
        self,
        model_cfg,
        generator_cfg,
        num_layers: int,
        embedding: torch.nn.Module,
        *,
        params_dtype: torch.dtype = torch.float32,
        use_cpu_initialization: Optional[bool] = None,
        recompute_granularity: Optional[str] = None,
    ):
        if num_layers < 1:
            raise ValueError(f"the generator needs at least one layer, got {num_layers}")
        config = t5_transformer_config(
            d_model=model_cfg.d_model,
            d_kv=model_cfg.d_kv,
            d_ff=generator_cfg.d_ff or model_cfg.d_ff,
            num_heads=generator_cfg.num_heads or model_cfg.num_heads,
            num_layers=num_layers,
            dropout=model_cfg.dropout,
            layer_norm_epsilon=model_cfg.layer_norm_epsilon,
            init_method_std=model_cfg.init_method_std,
            tensor_model_parallel_size=1,
            params_dtype=params_dtype,
            use_cpu_initialization=use_cpu_initialization,
            recompute_granularity=recompute_granularity,
        )
        super().__init__(config=config)
        self.pg_collection = generator_process_groups()
        self.tp_group = self.pg_collection.tp
        # Read by Megatron's finalize_model_grads (G holds no embedding of its own).
        self.share_embeddings_and_output_weights = False
        self.pre_process = self.post_process = True
        self.model_type = ModelType.encoder_or_decoder
        self.encoder = T5Stack(
            config,
            t5_encoder_layer_spec(),
            num_layers,
            bidirectional=True,
            num_buckets=model_cfg.relative_attention_num_buckets,
            max_distance=model_cfg.relative_attention_max_distance,
            pg_collection=self.pg_collection,
        )
        self.dropout = torch.nn.Dropout(model_cfg.dropout)
        self.mlm_head = MLMHead()
        # Shared with D; bypass nn.Module registration on purpose (see the module docstring).
        object.__setattr__(self, "_shared_embedding", embedding)

    @property
    def shared_embedding(self) -> torch.nn.Module:
        return self._shared_embedding

    def _local_rows(self, batch_size: int) -> slice:
        """Rows of the micro-batch this rank runs through G's layers ([3/5]: a TP share)."""
        return slice(0, batch_size)

    def _gather_rows(self, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Inverse of :meth:`_local_rows` (``[s, rows, h]`` -> ``[s, b, h]``); identity today."""
        return hidden

    def forward(
        self,
        tokens: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """MLM logits ``[b, m, V/tp]`` at ``positions`` ``[b, m]`` (all positions when None)."""
        emb = self.shared_embedding(tokens).transpose(0, 1).contiguous()  # [s, b, h], TP collective
        emb = self.dropout(emb)
        mask = padding_mask_or_none(enc_mask)
        rows = self._local_rows(tokens.size(0))
        hidden = self.encoder.run(emb[:, rows], None if mask is None else mask[rows])
        hidden = self._gather_rows(self.dropout(hidden), tokens.size(0)).transpose(0, 1)  # [b, s, h]
        if positions is not None:
            hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return self.mlm_head(hidden, self.shared_embedding.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """G's tensors are whole on every TP rank: mark TP ranks > 0 as replicas for checkpoints."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        _set_tp_replica(sd, tp_rank)
        return sd


def _set_tp_replica(tree, tp_rank: int) -> None:
    """Sets the TP component (index 1) of every replica_id in a sharded state dict to ``tp_rank``."""
    if isinstance(tree, dict):
        for v in tree.values():
            _set_tp_replica(v, tp_rank)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _set_tp_replica(v, tp_rank)
    elif hasattr(tree, "replica_id"):
        rid = tree.replica_id
        if isinstance(rid, tuple) and len(rid) >= 2:
            tree.replica_id = (rid[0], tp_rank, *rid[2:])
        elif isinstance(rid, int):
            tree.replica_id = (rid, tp_rank)


# ---- vocab-parallel sampling ------------------------------------------------------------------

_INT64_MAX = torch.iinfo(torch.int64).max


def sampling_seed(*key: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-batch, ...); stable across runs and hosts."""
    h = 0x243F6A8885A308D3
    for k in key:
        h ^= (int(k) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


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
    torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
    cand = torch.where(local_max == global_max, local_arg + vocab_start, torch.full_like(local_arg, _INT64_MAX))
    torch.distributed.all_reduce(cand, op=torch.distributed.ReduceOp.MIN, group=group)
    return cand


def allowed_vocab_bias(
    vocab_start: int,
    local_vocab: int,
    sample_vocab_size: int,
    forbidden_ids: Sequence[int] = (),
    device=None,
) -> torch.Tensor:
    """``[V/tp]`` fp32: 0 for ids that may be sampled, -inf for the rest."""
    ids = torch.arange(vocab_start, vocab_start + local_vocab, device=device)
    bad = ids >= sample_vocab_size
    for f in forbidden_ids:
        bad |= ids == int(f)
    bias = torch.zeros(local_vocab, dtype=torch.float32, device=device)
    return bias.masked_fill_(bad, float("-inf"))


@torch.no_grad()
def gumbel_max_sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    seed: int,
    sample_vocab_size: int,
    forbidden_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Samples ids from vocab-parallel ``logits`` ``[..., V/tp]`` -> ``[...]`` (int64, global ids).

    Noise for (row, global id) is drawn for the full vocabulary (``V/tp * tp`` columns) from
    ``torch.Generator(device).manual_seed(seed)`` and sliced, so the result does not depend on TP.
    """
    local_vocab = logits.size(-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, end = vocab_range(local_vocab)
    lead_shape = logits.shape[:-1]
    rows = logits.reshape(-1, local_vocab)
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(seed)
    u = torch.rand(rows.size(0), local_vocab * tp, generator=gen, device=logits.device, dtype=torch.float32)
    u = u[:, start:end]
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen
    scores = rows.float() / temperature + gumbel
    scores += allowed_vocab_bias(start, local_vocab, sample_vocab_size, forbidden_ids, logits.device)
    return vocab_parallel_argmax(scores, start).reshape(lead_shape)
