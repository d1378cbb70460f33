"""The generator G and vocab-parallel Gumbel-max sampling.

G is an encoder-only T5 stack: the same Megatron ``TransformerLayer`` spec as D's encoder, its own
relative position bias (bidirectional) and final RMSNorm, width ``d_model`` of D, depth
``generator_num_layers(cfg)``, ``d_ff``/heads from ``GeneratorConfig`` (None: D's), ``d_kv`` of D.
It reads D's token embedding (passed in, *not* registered as a submodule, so G's state dict, DDP
buckets and optimizer never hold it: the gradient G sends into it lands in D's DDP buffer through
the hook D's DDP put on that parameter) and its MLM head is tied to it (vocab-parallel logits).

G's layers are not tensor-split: they are Megatron layers built with a TP-size-1 config and a
process group holding only this rank (:func:`spactor_mega.parallel.state.self_group`), and no two
TP ranks run them on the same rows. Per micro-batch ``[b, s]``:

1. Embedding lookup on all rows (vocab-parallel: each TP rank looks up its vocabulary shard and
   Megatron all-reduces; under D's sequence parallelism the lookup is reduce-scattered over the
   sequence and :meth:`T5Generator.embed` all-gathers it back: G runs whole sequences), input
   dropout on all rows (the default generator is in step over TP).
2. :meth:`T5Generator._local_rows`: TP rank r keeps its share of the ``b`` rows (contiguous, as
   even as possible; :mod:`spactor_mega.parallel.row_shards`) and runs G's layers on those rows
   only, under the per-TP-rank RNG state :data:`~spactor_mega.parallel.state.ROW_SHARD_RNG` (so
   its dropout neither repeats another rank's masks nor desynchronises the default generator).
3. The MLM positions of those rows are picked, and :meth:`T5Generator._gather_rows` all-gathers
   them (``[b, m, h]``, the same on every TP rank) before output dropout and the tied,
   vocab-parallel MLM head; the MLM loss and Gumbel-max sampling work on its vocab-parallel
   logits as before.

Backward: the MLM head all-reduces the hidden-state gradient over TP, so every TP rank holds the
full ``[b, m, h]`` gradient and the gather hands each rank the gradient of its own rows; G's
parameter gradients on rank r are those of its rows only (their sum over TP is the full
gradient), and the split all-gathers the input gradients, so every rank passes the full
gradient of all rows into its shard of D's embedding (exact, as with TP = 1).
:class:`GeneratorDDP` reduces G's gradients over exactly the ranks that hold copies of G, TP x DP
(of stage 0), summing over TP and averaging over DP. G's FLOPs per TP rank are 1/TP of the
total (layers: the rank's rows; head: its vocabulary shard) up to the rounding of an uneven share.

Sampling (:func:`gumbel_max_sample`): ``argmax(logit / T + g)`` with Gumbel noise ``g`` keyed by
(sample, vocabulary block): the vocabulary is cut into blocks of :data:`NOISE_BLOCK` ids that do not
depend on TP, and each (sample, block) draws its noise from a generator seeded by the sample's own
key (the key its span corruption and MLM mask come from) and the block's index. Each TP rank draws
only the blocks its shard overlaps, and a sample gets the same replacements whatever the TP size,
DP size, micro-batch size or position in the batch. Each rank takes its
local max, the max is all-reduced (MAX) over TP and the smallest global id reaching it wins (MIN):
the same tie-break as ``torch.argmax``. Ids outside ``[0, sample_vocab_size)`` (padded rows, and
for a T5 vocabulary the sentinels and the mask token, which sit above the SentencePiece ids) and
``forbidden_ids`` (pad, EOS) are never sampled.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from ..parallel.row_shards import gather_rows, row_slice, split_rows
from ..parallel.state import ROW_SHARD_RNG, self_group
from ..seeding import seed_from
from .heads import MLMHead
from .losses import vocab_parallel_argmax, vocab_range
from .init import initialize_generator, mark_tensor_parallel, tied_logits_scale
from .spec import t5_transformer_config
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
        init_seed: int,
        params_dtype: torch.dtype = torch.float32,
        use_cpu_initialization: Optional[bool] = None,
    ):
        """Weights: ``model_cfg.init`` seeded by ``init_seed`` (part "generator", layers by index)."""
        if num_layers < 1:
            raise ValueError(f"the generator needs at least one layer, got {num_layers}")
        config = t5_transformer_config(
            model_cfg, num_layers=num_layers, d_ff=generator_cfg.d_ff, num_heads=generator_cfg.num_heads,
            params_dtype=params_dtype, use_cpu_initialization=use_cpu_initialization,
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
            num_layers,
            decoder=False,
            num_buckets=model_cfg.relative_attention_num_buckets,
            max_distance=model_cfg.relative_attention_max_distance,
            per_layer_bias=model_cfg.relative_attention_per_layer,  # G's layers are D's kind
            pg_collection=self.pg_collection,
        )
        # Marked as Megatron marks its linears (TP-split even at TP size 1); G's are whole copies
        # on every TP rank, so the optimizer's grad norm must count them once per TP group.
        mark_tensor_parallel(self.encoder)
        for p in self.parameters():
            p.tensor_model_parallel = False
        self.dropout = torch.nn.Dropout(model_cfg.dropout)
        self.mlm_head = MLMHead(tied_logits_scale(model_cfg.init, model_cfg.d_model))
        # Shared with D; bypass nn.Module registration on purpose (see the module docstring).
        object.__setattr__(self, "_shared_embedding", embedding)
        initialize_generator(self, model_cfg.init, init_seed)

    @property
    def shared_embedding(self) -> torch.nn.Module:
        return self._shared_embedding

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s, h]``, all rows and the whole sequence, the same on every TP rank."""
        emb = self.shared_embedding(tokens)
        if self.shared_embedding.reduce_scatter_embeddings:  # D's sequence parallelism: [s/tp, b, h]
            # G's backward hands every TP rank the same full gradient (see the module docstring),
            # so the gather's backward keeps this rank's part instead of summing over TP.
            emb = tensor_parallel.gather_from_sequence_parallel_region(
                emb, tensor_parallel_output_grad=False, group=self.shared_embedding.tp_group
            ).transpose(0, 1)
        return emb

    def _local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's share of the rows of ``full`` ``[b, ...]`` (the same on every TP rank)."""
        return split_rows(full, parallel_state.get_tensor_model_parallel_group())

    def _gather_rows(self, local: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Inverse of :meth:`_local_rows`: ``[rows, ...]`` -> ``[b, ...]`` on every TP rank."""
        return gather_rows(local, batch_size, parallel_state.get_tensor_model_parallel_group())

    def forward(
        self,
        tokens: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        has_padding: Optional[bool] = None,
    ) -> torch.Tensor:
        """MLM logits ``[b, m, V/tp]`` at ``positions`` ``[b, m]`` (all positions when None).
        ``has_padding``: of the whole ``enc_mask`` (see :func:`~spactor_mega.model.t5.padding_mask_or_none`;
        this rank's rows may then have none and still run masked, with the same result)."""
        b = tokens.size(0)
        emb = self.dropout(self.embed(tokens))  # [b, s, h], TP collective
        mine = row_slice(b, parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_world_size())
        mask = None if enc_mask is None else padding_mask_or_none(enc_mask[mine], has_padding)
        hidden = self._local_rows(emb)  # [rows, s, h]
        if hidden.size(0) > 0:  # b < TP leaves a rank no rows; Megatron's attention cannot reshape none
            with tensor_parallel.get_cuda_rng_tracker().fork(ROW_SHARD_RNG):
                hidden = self.encoder.run(hidden.transpose(0, 1).contiguous(), mask).transpose(0, 1)
        if positions is not None:
            hidden = hidden.gather(1, positions[mine].unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        hidden = self.dropout(self._gather_rows(hidden, b))  # [b, m, h], the same on every TP rank
        return self.mlm_head(hidden, self.shared_embedding.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """G's tensors are whole on every TP rank: mark TP ranks > 0 as replicas for checkpoints."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        _set_tp_replica(sd, tp_rank)
        return sd


class GeneratorDDP(DistributedDataParallel):
    """Megatron DDP for G over every rank holding a copy of it: the TP x DP group (of stage 0).

    Each TP rank back-propagates only its rows, so G's gradient is the *sum* over TP and the
    *mean* over DP. Megatron DDP scales by 1 / (its group's size) = 1 / (TP x DP) before its sum
    all-reduce (and has no separate scale for a group that is not all data parallel), so
    :meth:`finish_grad_sync` first multiplies the accumulated local gradients by TP.
    """

    def __init__(self, generator: "T5Generator", ddp_config):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if ddp_config.use_distributed_optimizer or (tp > 1 and ddp_config.overlap_grad_reduce):
            # A distributed optimizer would shard G over Megatron's DP group, not over TP x DP;
            # overlapped buckets start reducing during backward, before the TP scaling below.
            raise ValueError("GeneratorDDP needs use_distributed_optimizer=False, and overlap_grad_reduce=False under TP > 1")
        groups = copy.copy(generator.pg_collection)
        groups.dp = groups.dp_cp = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        super().__init__(generator.config, ddp_config, generator, pg_collection=groups)
        self.row_shards = tp

    def finish_grad_sync(self, *args, **kwargs):
        if self.row_shards > 1:
            self.scale_gradients(float(self.row_shards))
        return super().finish_grad_sync(*args, **kwargs)


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

NOISE_BLOCK = 4096
"""Columns of one draw of Gumbel noise: the vocabulary is cut into blocks of this many ids, fixed
whatever the TP size, and each (row, block) has its own generator, so a rank draws only the blocks
its shard overlaps (at most 2 blocks more than its shard) and every layout sees the same noise. Larger
blocks mean fewer draws (kernel launches on a GPU: rows x V / block per micro-batch at TP = 1), smaller
ones less overdraw at a large TP (TP = 8 shard of T5's 32128 ids: 4016, 1 or 2 blocks)."""


def disallowed_local_ids(vocab_start: int, local_vocab: int, sample_vocab_size: int,
                         forbidden_ids: Sequence[int] = ()) -> list[int]:
    """This shard's column indices of ids that are never sampled: ``>= sample_vocab_size`` (padded
    rows; for T5 the sentinels and the mask token) and ``forbidden_ids`` (pad, EOS)."""
    end = vocab_start + local_vocab
    bad = set(range(max(sample_vocab_size, vocab_start), end))
    bad.update(int(f) for f in forbidden_ids if vocab_start <= int(f) < end)
    return sorted(v - vocab_start for v in bad)


@torch.no_grad()
def gumbel_max_sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    row_seeds: Sequence[int],
    sample_vocab_size: int,
    forbidden_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Samples ids from vocab-parallel ``logits`` ``[b, ..., V/tp]`` -> ``[b, ...]`` (int64, global ids).

    ``argmax(logit - T log(-log u))`` (= ``argmax(logit / T + Gumbel)``), computed in fp32 whatever
    the logits' dtype. Row ``i``'s uniforms ``u`` for the ids of vocabulary block ``k``
    (:data:`NOISE_BLOCK` ids, or the whole vocabulary if smaller) are ``torch.rand(positions, block)``
    from a generator seeded with ``seed_from(row_seeds[i], k)``: a row's samples depend on its seed and logits only, not on TP
    nor on which other rows share the batch, and a rank draws noise for its shard's blocks only.
    ``row_seeds``: a Python sequence of ints (host side: no device read).
    """
    if len(row_seeds) != logits.size(0):
        raise ValueError(f"gumbel_max_sample: {len(row_seeds)} row seeds for {logits.size(0)} rows")
    local_vocab = logits.size(-1)
    start, end = vocab_range(local_vocab)
    per_row = logits[0].numel() // local_vocab
    flat = logits.reshape(logits.size(0), per_row, local_vocab)
    scores = torch.empty(flat.shape, dtype=torch.float32, device=logits.device)
    # A vocabulary smaller than a block is one block of its own size (the same on every layout).
    width = min(NOISE_BLOCK, local_vocab * parallel_state.get_tensor_model_parallel_world_size())
    gen = torch.Generator(device=logits.device)
    for i, seed in enumerate(row_seeds):
        for block in range(start // width, (end - 1) // width + 1):
            gen.manual_seed(seed_from(int(seed), block))
            u = torch.rand(per_row, width, generator=gen, device=logits.device, dtype=torch.float32)
            # T log(-log u) = -T Gumbel over the whole block: every op sees the same shape on every
            # layout (an elementwise kernel's vector body and scalar tail may round log differently).
            # u = 0 gives log(-log 0) = +inf here, a score of -inf: never chosen.
            noise = u.log_().neg_().log_()
            if temperature != 1.0:
                noise.mul_(temperature)
            lo, hi = max(start, block * width), min(end, (block + 1) * width)
            # logit - T log(-log u): exactly rounded ops only (the fp32 cast of bf16 logits is exact;
            # cast, then subtract in place: a mixed-dtype sub is slower on CPU).
            scores[i, :, lo - start:hi - start].copy_(flat[i, :, lo - start:hi - start]).sub_(
                noise[:, lo - block * width:hi - block * width])
    bad = disallowed_local_ids(start, local_vocab, sample_vocab_size, forbidden_ids)
    if bad:
        scores.index_fill_(-1, torch.tensor(bad, device=logits.device), float("-inf"))
    return vocab_parallel_argmax(scores, start).view(logits.shape[:-1])
