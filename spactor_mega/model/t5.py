"""The discriminator D: a T5 (HF ``T5ForConditionalGeneration`` / ``MT5...`` / ``UMT5...``-exact) from
Megatron-Core parts. T5 v1.1 by default; ``model.feed_forward``, ``model.tie_word_embeddings`` and
``model.relative_attention_per_layer`` give T5 v1.0, UMT5 and UL2-style feed-forwards.

Layout (parameter names are what :mod:`spactor_mega.model.hf_mapping` maps):

- ``embedding``: ``VocabParallelEmbedding`` ``[V/tp, d_model]``, shared by encoder and decoder
  (and lent to G). No scaling (T5).
- ``encoder`` / ``decoder``: :class:`T5Stack`, a Megatron ``TransformerBlock`` (``.layers`` is a
  ``ModuleList`` of ``TransformerLayer``; ``.final_layernorm`` a :class:`T5RMSNorm`) plus the
  stack's own ``relative_attention_bias`` (bidirectional buckets in the encoder, causal in the
  decoder), computed once per forward and shared by all layers of the stack; with
  ``relative_attention_per_layer`` (UMT5) each layer's self-attention holds its own table instead
  (``layers.<k>.self_attention.core_attention.relative_attention_bias``). Cross-attention gets no
  position bias.
- ``lm_head``: ``ColumnParallelLinear`` ``[V/tp, d_model]``: untied without rescaling (v1.1), or
  with ``tie_word_embeddings`` (v1.0) the embedding itself, read by the decoder output times
  ``d_model**-0.5``: on a stage holding the embedding the head has no weight of its own; a later
  pipeline stage holds a copy that :mod:`spactor_mega.model.stages` keeps equal to it (as Megatron
  does for tied output layers). Its logits stay vocab-parallel for
  ``tensor_parallel.vocab_parallel_cross_entropy``.

Tensors are batch-first at this module's edges and sequence-first ``[s, b, h]`` inside.

Sequence parallelism (``sequence_parallel``, Megatron's; needs TP > 1): between the linears, every
hidden state is this TP rank's sequence shard ``[s / tp, b, h]`` (norms, dropout and residuals on
the shard; Megatron's column-parallel linears all-gather the sequence, its row-parallel linears
reduce-scatter it). The embedding reduce-scatters its lookup (instead of all-reducing it), the
decoder's cross-attention all-gathers the sharded encoder output in its KV projection, and the LM
head all-gathers its input (logits for the whole sequence). The decoder input is padded at the end
to a multiple of TP (:meth:`T5Discriminator.padded_decoder_length`; causal, so the real positions
never see the pad; their labels are not scored); the encoder length must divide by TP
(``data.encoder_seq_length``). The norms' weights see a shard only: Megatron's
``finalize_model_grads`` sums their gradients over TP (they are marked ``sequence_parallel``).

Pipeline stages (built by :mod:`spactor_mega.model.stages`, run by :mod:`spactor_mega.training.pipeline_step`): ``encoder_layers`` /
``decoder_layers`` (global ``[start, end)`` ranges) select the layers a stage holds;
``pre_process`` (embedding here) is stage 0, ``post_process`` (LM head) the last stage. Stage
modules keep *global* parameter names in checkpoints (layer ``k`` of the encoder is
``encoder.layers.k`` whatever the stage), and :meth:`T5Discriminator.stage_forward` moves one
packed ``[s_enc + s_dec, b, h]`` tensor between stages. The stacks' layer configs keep
``pipeline_model_parallel_size=1`` (Megatron's own splitting is not used). The RTD head is not
part of D (see :mod:`spactor_mega.model.heads`), so D is exactly what is exported.

Differences from HF that matter only with dropout > 0 (T5 v1.1 pretrains without dropout): HF
also drops out inside the FFN (after ``gelu(wi_0 x) * wi_1 x``); Megatron's MLP has no such site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import transformer_block
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size

from spactor_mega.data.special_tokens import PAD_ID

from .attention import RelativeBiasSpec, RelativePositionBias, additive_attention_mask, additive_padding_mask
from .init import initialize_discriminator, mark_tensor_parallel
from .norm import T5RMSNorm
from .spec import t5_decoder_layer_spec, t5_encoder_layer_spec, t5_transformer_config


# HF's T5 checkpoints pad the vocabulary to a multiple of 128 (32,128 rows for 32,100 pieces + 1)
HF_VOCAB_MULTIPLE = 128


def padded_vocab_size(n: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Smallest multiple of ``lcm(divisible_by, tp)`` that is >= ``n`` (so each TP shard is even).

    Megatron pads to ``divisible_by * tp``, which makes the embedding's shape depend on TP; the
    least common multiple keeps it the same for every TP that divides ``divisible_by`` (1, 2, 4,
    ... 128 for the default 128), so checkpoints move between those layouts. The price: a TP shard
    need not be a multiple of 128 (T5's 32,128 rows at TP 8: 4,016, a multiple of 16, which tensor
    cores take); ``make_vocab_size_divisible_by: 1024`` makes every shard up to TP 8 one (32,768 rows
    at any TP) and still exports T5's 32,128 (:func:`export_vocab_size`). tools/gpu_check.py times
    the LM head's GEMM at both shard sizes."""
    if n <= 0 or divisible_by <= 0 or tp <= 0:
        raise ValueError(f"padded_vocab_size needs positive arguments, got {n}, {divisible_by}, {tp}")
    multiple = math.lcm(divisible_by, tp)
    return -(-n // multiple) * multiple


def model_vocab_size(model_cfg, tokenizer_rows: int, tp: int) -> int:
    """D's embedding rows under TP size ``tp``: the tokenizer's rows (pieces, sentinels, mask) or
    ``model.vocab_size`` (an imported HF model's), whichever is larger, padded."""
    rows = max(tokenizer_rows, model_cfg.vocab_size or 0)
    return padded_vocab_size(rows, model_cfg.make_vocab_size_divisible_by, tp)


def export_vocab_size(model_cfg, tokenizer_rows: int) -> int:
    """Rows of an exported HF model's embedding and head: ``model.vocab_size`` when set, else the
    tokenizer's rows padded to a multiple of gcd(``make_vocab_size_divisible_by``, 128): T5's
    convention (32,101 -> 32,128), also when the model pads further for its TP shards (never more
    rows than the model has: a multiple of the padding is one of the gcd)."""
    multiple = math.gcd(model_cfg.make_vocab_size_divisible_by, HF_VOCAB_MULTIPLE)
    return model_cfg.vocab_size or padded_vocab_size(tokenizer_rows, multiple, 1)


def padding_mask_or_none(mask: Optional[torch.Tensor], has_padding: Optional[bool] = None) -> Optional[torch.Tensor]:
    """``mask`` (bool ``[b, s]``, True = real token), or None when it has no padding (cheaper).
    ``has_padding``: whether it has, as the caller knows it on the host (the training loop reads it
    from the batch's CPU side); None: read from ``mask``, a device sync on a GPU."""
    if mask is None or has_padding is False:
        return None
    mask = mask.bool()
    if has_padding:
        return mask
    return None if bool(mask.all()) else mask


class T5Stack(TransformerBlock):
    """A Megatron ``TransformerBlock`` of T5 layers + final RMSNorm + the relative position bias:
    the stack's one table (``relative_attention_bias``), or with ``per_layer_bias`` (UMT5) one in
    each layer's self-attention (the stack has none then)."""

    def __init__(
        self,
        config: TransformerConfig,
        num_layers: int,
        *,
        decoder: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        per_layer_bias: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        layer_offset: int = 0,
    ):
        """``decoder``: causal self-attention and cross-attention layers; else an encoder stack
        (bidirectional). ``num_layers`` is the number of layers *held* (a pipeline stage's share),
        the first of them global layer ``layer_offset``; ``config.num_layers`` stays the stack's
        total. ``post_process``: this part holds the stack's last layer (gets the final norm). The
        weights are set by the model holding the stack (:mod:`spactor_mega.model.init`)."""
        bias = RelativeBiasSpec(bidirectional=not decoder, num_buckets=num_buckets, max_distance=max_distance)
        layer_spec = (t5_decoder_layer_spec if decoder else t5_encoder_layer_spec)(bias if per_layer_bias else None)
        spec = TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=T5RMSNorm)
        super().__init__(
            config=config,
            spec=spec,
            post_layer_norm=True,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
        )
        self.causal = decoder
        self.num_buckets = num_buckets
        self.relative_attention_bias = None if per_layer_bias else RelativePositionBias(
            config, bias.bidirectional, num_buckets, max_distance, tp_group=self.tp_group
        )
        self.layer_offset = layer_offset
        # Under sequence parallelism the hidden states are 1 / TP of the sequence.
        self.sequence_shards = get_pg_size(self.tp_group) if config.sequence_parallel else 1
        for layer in self.layers:  # global numbering, as Megatron's own pipeline split does
            layer.layer_number += layer_offset

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's, with this part's layers at their global positions (so checkpoints do not
        depend on the pipeline split)."""
        original = transformer_block.get_transformer_layer_offset
        offset = self.layer_offset
        transformer_block.get_transformer_layer_offset = lambda *args, **kwargs: offset
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            transformer_block.get_transformer_layer_offset = original

    def run(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Bias (or, with per-layer tables, the masks alone) once, then every layer.
        ``hidden_states``/``context`` ``[s, b, h]`` (this rank's sequence shards under sequence
        parallelism); masks bool ``[b, s]`` over whole sequences (True = real token) or None for no
        padding."""
        q_len = hidden_states.size(0) * self.sequence_shards  # core attention sees whole sequences
        dtype = self.config.params_dtype
        if self.relative_attention_bias is not None:
            bias = self.relative_attention_bias.attention_bias(q_len, q_len, key_padding_mask)
        else:  # each layer adds its own table (UMT5)
            bias = additive_attention_mask(q_len, q_len, self.causal, key_padding_mask, dtype, hidden_states.device)
        context_mask = None
        if context is not None:
            context_mask = additive_padding_mask(context_padding_mask, dtype)
        # The bias travels as the (additive, float) self-attention mask, not as `attention_bias`:
        # Megatron's activation recompute passes attention_mask through its checkpoint function as
        # an argument (so the bias table's gradient is carried), but captures attention_bias in a
        # closure (its graph would be freed by the first recomputed chunk's backward).
        return self(
            hidden_states=hidden_states,
            attention_mask=bias,
            context=context,
            context_mask=context_mask,
        )


def _mark_replica(sharded) -> None:
    """Marks a ``ShardedTensor`` as a replica of one saved elsewhere (first replica-id axis 1)."""
    if hasattr(sharded, "replica_id"):
        rid = sharded.replica_id
        rid = tuple(rid) if isinstance(rid, (tuple, list)) else (rid,)
        sharded.replica_id = (1, *rid[1:])


@dataclass
class T5Output:
    encoder_hidden: Optional[torch.Tensor] = None  # [s_enc, b, h] after the final norm
    lm_logits: Optional[torch.Tensor] = None  # [s_dec, b, V/tp], vocab-parallel
    lm_loss: Optional[torch.Tensor] = None  # [b, s_dec] per-token CE when labels were given


class T5Discriminator(MegatronModule):
    """D. ``vocab_size`` is the padded model vocabulary (see :func:`padded_vocab_size`)."""

    def __init__(
        self,
        model_cfg,
        vocab_size: int,
        *,
        params_dtype: torch.dtype = torch.float32,
        pre_process: bool = True,
        post_process: bool = True,
        use_cpu_initialization: Optional[bool] = None,
        encoder_layers: Optional[tuple[int, int]] = None,
        decoder_layers: Optional[tuple[int, int]] = None,
        init_seed: int = 0,
        sequence_parallel: bool = False,
    ):
        """``encoder_layers`` / ``decoder_layers``: the global ``[start, end)`` layers of each
        stack this (pipeline stage) module holds; None = all of that stack. An empty range means the
        stack is absent here. ``sequence_parallel``: Megatron's (needs TP > 1; see the module
        docstring). Weights: ``model_cfg.init``
        seeded by ``init_seed`` (:func:`~spactor_mega.model.init.initialize_discriminator`: the
        same for any TP/PP layout and device)."""
        n_enc, n_dec = model_cfg.num_encoder_layers, model_cfg.num_decoder_layers
        encoder_layers = (0, n_enc) if encoder_layers is None else encoder_layers
        decoder_layers = (0, n_dec) if decoder_layers is None else decoder_layers
        for what, (a, b), n in (("encoder", encoder_layers, n_enc), ("decoder", decoder_layers, n_dec)):
            if not 0 <= a <= b <= n:
                raise ValueError(f"{what} layer range {(a, b)} is not within [0, {n}]")
        add_encoder, add_decoder = encoder_layers[1] > encoder_layers[0], decoder_layers[1] > decoder_layers[0]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if vocab_size % tp:
            raise ValueError(f"vocab_size {vocab_size} is not divisible by TP size {tp}; pad it")
        common = dict(tensor_model_parallel_size=tp, params_dtype=params_dtype,
                      use_cpu_initialization=use_cpu_initialization, sequence_parallel=sequence_parallel)
        encoder_config = t5_transformer_config(model_cfg, num_layers=model_cfg.num_encoder_layers, **common)
        decoder_config = t5_transformer_config(model_cfg, num_layers=model_cfg.num_decoder_layers, **common)
        super().__init__(config=encoder_config)
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        self.encoder_config, self.decoder_config = encoder_config, decoder_config
        self.pre_process, self.post_process = pre_process, post_process
        self.add_encoder, self.add_decoder = add_encoder, add_decoder
        self.encoder_layers, self.decoder_layers = tuple(encoder_layers), tuple(decoder_layers)
        # This part holds the encoder's last layer: it applies the encoder's final norm.
        self.ends_encoder = add_encoder and encoder_layers[1] == n_enc
        # Read by Megatron's finalize_model_grads / pipeline schedules (one packed stream).
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.sequence_parallel = sequence_parallel
        self.sequence_shards = tp if sequence_parallel else 1

        buckets = dict(
            num_buckets=model_cfg.relative_attention_num_buckets,
            max_distance=model_cfg.relative_attention_max_distance,
            per_layer_bias=model_cfg.relative_attention_per_layer,
        )
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                num_embeddings=vocab_size,
                embedding_dim=model_cfg.d_model,
                init_method=encoder_config.init_method,
                # sequence parallel: reduce-scatter the lookup over the sequence (this rank's shard)
                reduce_scatter_embeddings=sequence_parallel,
                config=encoder_config,
            )
        self.dropout = torch.nn.Dropout(model_cfg.dropout)
        if add_encoder:
            self.encoder = T5Stack(
                encoder_config,
                encoder_layers[1] - encoder_layers[0],
                decoder=False,
                pre_process=True,  # hidden states are always passed explicitly (see stage_forward)
                post_process=self.ends_encoder,
                layer_offset=encoder_layers[0],
                **buckets,
            )
        if add_decoder:
            if post_process and decoder_layers[1] != n_dec:
                raise ValueError("the last stage must hold the last decoder layer")
            self.decoder = T5Stack(
                decoder_config,
                decoder_layers[1] - decoder_layers[0],
                decoder=True,
                pre_process=True,
                post_process=decoder_layers[1] == n_dec,
                layer_offset=decoder_layers[0],
                **buckets,
            )
        # T5 v1.0: the LM head is the embedding, read by a decoder output scaled by d_model**-0.5.
        self.tied_head = model_cfg.tie_word_embeddings
        self.output_scale = model_cfg.d_model**-0.5 if self.tied_head else 1.0
        if post_process:
            self.lm_head = tensor_parallel.ColumnParallelLinear(
                model_cfg.d_model,
                vocab_size,
                config=decoder_config,
                init_method=decoder_config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
                # tied, with the embedding on this stage: the head reads it (no weight of its own)
                skip_weight_param_allocation=self.tied_head and pre_process,
            )
        mark_tensor_parallel(self)
        if self.tied_head and post_process and not pre_process:
            # A later stage's copy of the embedding, kept equal to it by model.stages (as Megatron
            # keeps a tied output layer): counted once by the grad norm, in a bucket of its own.
            self.lm_head.weight.shared = True
        if self.tied_head and (pre_process or post_process):
            self.shared_embedding_or_output_weight().shared_embedding = True
        initialize_discriminator(self, model_cfg.init, init_seed)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by Megatron's schedules on every stage before forward: a non-first stage's
        received packed tensor, read by :meth:`stage_forward` (None with one stage)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if input_tensor is not None and self.pre_process:
            raise RuntimeError("the first pipeline stage takes no input tensor")
        self.input_tensor = input_tensor

    # ---- pipeline stage (one packed [s_enc + s_dec, b, h] stream) --------------------------------
    def padded_decoder_length(self, s_dec: int) -> int:
        """The decoder length D runs: ``s_dec``, or under sequence parallelism the next multiple
        of TP (the decoder input is padded at the end; see the module docstring)."""
        return -(-s_dec // self.sequence_shards) * self.sequence_shards

    def packed_length(self, s_enc: int, s_dec: int) -> int:
        """The whole packed sequence a pipeline stage sends (``seq_length`` of Megatron's schedule,
        which divides it by TP under sequence parallelism)."""
        return s_enc + self.padded_decoder_length(s_dec)

    def stage_forward(
        self,
        enc_tokens: Optional[torch.Tensor],
        dec_input: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        has_padding: Optional[bool] = None,
    ):
        """This stage's part of D. Stage 0 embeds ``enc_tokens`` and ``dec_input``; later stages
        read the packed tensor given to :meth:`set_input_tensor`. Encoder layers update the
        encoder part, decoder layers the decoder part (cross-attending to the encoder part, which
        has had the final norm by then). Returns the packed ``[s_enc + s_dec, b, h]`` tensor, or on
        the last stage ``(encoder_hidden, decoder_hidden)`` (both final-normed); under sequence
        parallelism each part is this rank's shard (``[s_enc/tp + s_dec'/tp, b, h]``, ``s_dec'``
        the padded decoder length). ``dec_input`` is needed on every stage for the decoder length.
        ``has_padding``: see :func:`padding_mask_or_none`."""
        mask = padding_mask_or_none(enc_mask, has_padding)
        if self.pre_process:
            enc = self._dropout(self.embed(enc_tokens))
            dec = self._dropout(self.embed(self._pad_decoder_input(dec_input)))
        else:
            packed = self.input_tensor
            if packed is None:
                raise RuntimeError("a non-first stage needs set_input_tensor before stage_forward")
            s_enc = packed.size(0) - self.padded_decoder_length(dec_input.size(1)) // self.sequence_shards
            enc, dec = packed[:s_enc], packed[s_enc:]
        if self.add_encoder:
            enc = self.encoder.run(enc, mask)
            if self.ends_encoder:
                enc = self._dropout(enc)
        if self.add_decoder:
            dec = self.decoder.run(dec, None, context=enc, context_padding_mask=mask)
            if self.post_process:
                dec = self._dropout(dec)
        if self.post_process:
            return enc, dec
        return torch.cat([enc, dec], dim=0)  # a new tensor (the schedule may deallocate outputs)

    def global_parameter_name(self, name: str) -> str:
        """The parameter's name in the whole (one-stage) model: stage layer ``i`` of a stack is
        global layer ``i + offset``."""
        for stack, (start, _) in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
            head = f"{stack}.layers."
            if name.startswith(head):
                index, rest = name[len(head):].split(".", 1)
                return f"{head}{int(index) + start}.{rest}"
        return name

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's; relative-bias tables replicated on several stages are saved by the first
        stage holding them (the others are marked replicas), and a later stage's copy of a tied
        head is a replica of ``embedding.weight`` (loaded from it, as Megatron's tied output layer)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for stack, (start, end) in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
            first_holder = start == 0
            if end > start and not first_holder:
                for key, value in sd.items():
                    if key.startswith(f"{prefix}{stack}.relative_attention_bias."):
                        _mark_replica(value)
        head = sd.get(f"{prefix}lm_head.weight")
        if self.tied_head and head is not None:
            head.key = f"{prefix}embedding.weight"
            head.allow_shape_mismatch = True  # as the embedding's own entry (Megatron's)
            _mark_replica(head)
        return sd

    # ---- pieces (the step function and G use these) -------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, s]`` -> ``[s, b, h]`` (vocab-parallel lookup, all-reduced over TP), or
        under sequence parallelism this rank's shard ``[s / tp, b, h]`` (reduce-scattered)."""
        hidden = self.embedding(tokens)
        return hidden if self.sequence_parallel else hidden.transpose(0, 1).contiguous()

    def _dropout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dropout; sequence shards differ over TP, so they draw from the per-TP-rank RNG state
        (as Megatron's embedding and layers do under sequence parallelism)."""
        if not self.sequence_parallel:
            return self.dropout(hidden)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.dropout(hidden)

    def _pad_decoder_input(self, dec_input: torch.Tensor) -> torch.Tensor:
        """``[b, s_dec]`` -> ``[b, padded_decoder_length(s_dec)]`` (PAD_ID at the end)."""
        pad = self.padded_decoder_length(dec_input.size(1)) - dec_input.size(1)
        return torch.nn.functional.pad(dec_input, (0, pad), value=PAD_ID) if pad else dec_input

    def encode(self, enc_tokens: torch.Tensor, enc_mask: Optional[torch.Tensor] = None,
               has_padding: Optional[bool] = None) -> torch.Tensor:
        """Encoder output ``[s_enc, b, h]`` (final norm applied; a sequence shard under sequence
        parallelism). ``has_padding``: see :func:`padding_mask_or_none`."""
        hidden = self._dropout(self.embed(enc_tokens))
        hidden = self.encoder.run(hidden, padding_mask_or_none(enc_mask, has_padding))
        return self._dropout(hidden)

    def decode(
        self,
        dec_input: torch.Tensor,
        encoder_hidden: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        has_padding: Optional[bool] = None,
    ) -> torch.Tensor:
        """Decoder output ``[s_dec, b, h]`` (final norm applied); causal self-attention. Under
        sequence parallelism a shard of the padded length (:meth:`padded_decoder_length`).
        ``has_padding``: of ``enc_mask``, see :func:`padding_mask_or_none`."""
        hidden = self._dropout(self.embed(self._pad_decoder_input(dec_input)))
        hidden = self.decoder.run(
            hidden, None, context=encoder_hidden, context_padding_mask=padding_mask_or_none(enc_mask, has_padding)
        )
        return self._dropout(hidden)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """With a tied head: the embedding on the first stage, the last stage's copy elsewhere
        (Megatron's name for it)."""
        return self.embedding.weight if self.pre_process else self.lm_head.weight

    def lm_logits(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[s_dec, b, V/tp]`` for every decoder position: under sequence
        parallelism the head all-gathers the shards, and ``s_dec`` is the padded length."""
        if self.tied_head:
            decoder_hidden = decoder_hidden * self.output_scale
        weight = self.embedding.weight if self.tied_head and self.pre_process else None
        logits, _ = self.lm_head(decoder_hidden, weight=weight)
        return logits

    def forward(
        self,
        enc_tokens: torch.Tensor,
        dec_input: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> T5Output:
        """Full D forward. With ``labels`` ``[b, s_dec]`` returns the per-token vocab-parallel CE
        ``lm_loss`` ``[b, s_dec]`` (logits are consumed by it); without, ``lm_logits``."""
        encoder_hidden = self.encode(enc_tokens, enc_mask)
        decoder_hidden = self.decode(dec_input, encoder_hidden, enc_mask)
        logits = self.lm_logits(decoder_hidden)[: dec_input.size(1)]  # without the padding
        if labels is None:
            return T5Output(encoder_hidden=encoder_hidden, lm_logits=logits)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
        return T5Output(encoder_hidden=encoder_hidden, lm_loss=loss.transpose(0, 1))
