"""Per-rank memory: the model states (parameters, gradients, optimizer) for an engine setup, and
the activations D's stacks keep for backward per micro-batch (:func:`activation_bytes`, by
``model.recompute``). Where each engine keeps what is the engine's own plan
(:mod:`spactor_mega.plan.engines`).
"""

from __future__ import annotations

from dataclasses import dataclass

from spactor_mega.config import Config
from spactor_mega.plan.derived import uses_bf16
from spactor_mega.plan.engines import engine_spec
from spactor_mega.plan.inventory import (
    count,
    generator_parameter_shapes,
    rtd_head_parameter_shapes,
    t5_parameter_shapes,
)

GIB = 1024 ** 3


def model_state_bytes(cfg: Config, params_per_rank: int, dp: int) -> dict[str, dict[str, float]]:
    """``{"gpu": {...}, "cpu": {...}}`` bytes of params / grads / optimizer on one rank.
    ``params_per_rank``: parameters this rank holds before any ZeRO split (after TP)."""
    return engine_spec(cfg.train.engine).plan.model_state_bytes(cfg, params_per_rank, dp)


def checkpoint_bytes(cfg: Config, vocab_size: int) -> float:
    """About the bytes of one checkpoint: the weights and optimizer state of D, G and the RTD head
    as the engine keeps them (Adafactor's factored moments not counted)."""
    n = sum(count(shapes) for shapes in (t5_parameter_shapes(cfg.model, vocab_size), generator_parameter_shapes(cfg),
                                         rtd_head_parameter_shapes(cfg.model.d_model)))
    est = model_state_bytes(cfg, n, 1)
    return sum(est[where]["params"] + est[where]["optimizer"] for where in ("gpu", "cpu"))


def describe_memory(cfg: Config, params_per_rank: int, dp: int) -> list[str]:
    """The ``--dry-run`` lines: our per-rank estimate, and the engine's own where it has one."""
    plan = engine_spec(cfg.train.engine).plan
    est = plan.model_state_bytes(cfg, params_per_rank, dp)

    def line(where: str) -> str:
        parts = est[where]
        return (f"{where.upper()} {sum(parts.values()) / GIB:,.2f} GiB (params {parts['params'] / GIB:,.2f}, "
                f"grads {parts['grads'] / GIB:,.2f}, optimizer {parts['optimizer'] / GIB:,.2f})")

    return [f"memory per rank, model states only ({plan.describe_setup(cfg)}, DP {dp}, "
            f"{'bf16' if uses_bf16(cfg) else 'fp32'}): {line('gpu')}; {line('cpu')}; plus activations",
            *plan.extra_memory_lines(cfg, params_per_rank, dp)]


RECOMPUTE = ("none", "selective", "full")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class _Shapes:
    """One rank's sizes: ``e`` bytes per activation element, ``b`` rows, ``h`` d_model, ``hq`` the
    rank's query width (heads / TP x d_kv), ``a`` its heads, ``f`` its d_ff, ``shard`` the share of the
    sequence an ``[s, b, h]`` tensor holds (1 / TP with sequence parallelism), ``mask`` bytes per
    element of a dropout mask (0 without dropout), ``device`` where the attention kernels run,
    ``gated`` the feed-forward's kind, ``layer_bias`` a position-bias table per layer (UMT5)."""

    e: int
    b: int
    h: int
    hq: int
    a: float
    f: float
    shard: float
    dropout: float
    mask: int
    device: str
    gated: bool
    layer_bias: bool

    def hidden(self, s: int) -> float:
        """An ``[s, b, h]`` activation: a linear's input, a kept layer input."""
        return s * self.b * self.h * self.e * self.shard

    def norm(self, s: int) -> float:
        """T5RMSNorm keeps its input and an fp32 inverse RMS per row."""
        return s * self.b * (self.h * self.e + 4) * self.shard

    def drop(self, s: int) -> float:
        """A dropout site on an ``[s, b, h]`` activation keeps its mask."""
        return s * self.b * self.h * self.mask * self.shard

    def mlp(self, s: int) -> float:
        """Megatron's gated MLP: fc1's output (2 f, read by GELU's or SiLU's backward), the
        activation's output, the linear half plus ``glu_linear_offset`` (a copy), their product
        (fc2's input). The ungated ReLU MLP: ReLU's output alone (its backward reads the output,
        and it is fc2's input)."""
        return (5 if self.gated else 1) * s * self.b * self.f * self.e

    def own_bias(self, s: int) -> float:
        """A layer's own position bias (UMT5) outside a checkpoint: on CUDA, the bias ``[1, heads,
        s, s]`` the fused kernel keeps (the decoder's: the table's plus the mask, a new tensor per
        layer); its int64 bucket indices are shared by the stack's tables and counted once there
        (:func:`_stack`). Inside a checkpoint (selective, full) nothing: it is built there."""
        return (self.device == "cuda") * self.a * s * s * self.e


def _shapes(cfg: Config, device: str) -> _Shapes:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    e = 2 if uses_bf16(cfg) else 4
    # CUDA's dropout keeps a bool mask; the CPU's multiplies by a mask in the activation's dtype.
    mask = 0 if m.dropout == 0 else (1 if device == "cuda" else e)
    return _Shapes(e=e, b=cfg.train.micro_batch_size, h=m.d_model, hq=m.num_heads * m.d_kv // tp,
                   a=m.num_heads / tp, f=m.d_ff / tp, shard=1 / tp if p.sequence_parallel else 1.0,
                   dropout=m.dropout, mask=mask, device=device, gated=m.feed_forward != "relu",
                   layer_bias=m.relative_attention_per_layer)


def _core_attention(x: _Shapes, s_q: int, s_kv: int, self_attention: bool, recompute: str) -> float:
    """Core attention's saved bytes plus the linear projections' outputs it reads (q, k, v) and the
    output projection's input; the position bias is the stack's (:func:`_stack`)."""
    projections = x.b * x.hq * x.e * (3 * s_q if self_attention else s_q + 2 * s_kv)
    proj_input = s_q * x.b * x.hq * x.e
    if recompute == "selective":  # Megatron's checkpoint keeps q, k, v (and the bias); recomputes the rest
        return projections + proj_input + 4  # + the mask type, which it passes as an int32 tensor
    fused = x.device == "cuda" or (not self_attention and x.dropout == 0)
    if fused:
        # SDPA's fused kernels (CUDA: memory-efficient attention, bias and dropout included; CPU:
        # flash attention, taken without a bias and without dropout) keep q, k, v, the output and
        # the fp32 log-sum-exp per query and head (CUDA pads the query length to 32). CUDA's output
        # is laid out [b, s, heads, d], so the [s, b, heads * d] reshape before the output
        # projection copies it; CPU flash writes the layout the reshape views.
        s_lse = -(-s_q // 32) * 32 if x.device == "cuda" else s_q
        output = proj_input if x.device == "cuda" else 0
        return projections + proj_input + output + 4 * x.b * x.a * s_lse
    # The CPU's math fallback (position bias with gradient, or dropout): in fp32 (bf16 inputs are
    # upcast), it keeps scaled copies of q and k, v (a view of its projection's output in fp32, an
    # fp32 copy in bf16), the softmax probabilities and, with dropout, its mask and the dropped ones.
    probabilities = 4 * x.b * x.a * s_q * s_kv * (3 if x.dropout else 1)
    q_and_k = 4 * x.b * x.hq * (s_q + s_kv)
    if x.e == 4:
        v = projections - (s_q * x.b * x.hq * x.e if not self_attention else 0)  # the storage v views
    else:
        v = 4 * x.b * x.hq * s_kv
    return q_and_k + v + probabilities + proj_input


def _layer(x: _Shapes, s: int, s_enc: int, cross: bool, recompute: str) -> float:
    """One T5 layer without checkpointing (``recompute`` none or selective): per block the pre-norm,
    the first linear's input, the block, the residual dropout; the decoder's cross-attention reads
    the encoder output, which the stack counts once (:func:`_stack`); a layer's own position bias."""
    attention = x.norm(s) + x.hidden(s) + _core_attention(x, s, s, True, recompute) + x.drop(s)
    if x.layer_bias and recompute == "none":
        attention += x.own_bias(s)
    mlp = x.norm(s) + x.hidden(s) + x.mlp(s) + x.drop(s)
    if cross:
        attention += x.norm(s) + x.hidden(s) + _core_attention(x, s, s_enc, False, recompute) + x.drop(s)
    return attention + mlp


def _stack(x: _Shapes, cfg: Config, layers: int, s: int, s_enc: int, decoder: bool, recompute: str) -> float:
    """A stack of ``layers`` layers of length ``s``: its layers, and once per stack the token ids
    (the embedding's saved indices), the embedding's and the final dropout, the final norm, the
    position bias' bucket indices (int64 ``[s, s]``), the bias itself where the fused kernel or a
    checkpoint keeps it (``[1, heads, s, s]``, one tensor for all layers), the decoder's causal mask
    (bool ``[s, s]``) and the encoder output its cross-attentions read. With a table per layer
    (UMT5) the layers count their own bias (:meth:`_Shapes.own_bias`) and the stack keeps the bucket
    indices their tables share (outside checkpoints) or the decoder's additive causal mask (``[1, 1,
    s, s]``, which checkpoints take as an input)."""
    if layers == 0:
        return 0.0
    m = cfg.model
    if recompute == "full":
        # Megatron's checkpoint keeps each chunk's input: chunks of recompute_num_layers layers
        # ("uniform"), or the first recompute_num_layers layers one by one, the rest whole ("block").
        n = m.recompute_num_layers
        if m.recompute_method == "block":
            kept = min(n, layers)
            per_layers = kept * x.hidden(s) + (layers - kept) * _layer(x, s, s_enc, decoder, "none")
        else:
            per_layers = -(-layers // n) * x.hidden(s)
    else:
        per_layers = layers * _layer(x, s, s_enc, decoder, recompute)
    if x.layer_bias:  # the shared bucket indices outside checkpoints; the decoder's mask into them
        bias = (recompute == "none") * 8 * s * s + decoder * (recompute != "none") * s * s * x.e
    else:
        keeps_bias = x.device == "cuda" or recompute != "none"
        bias = 8 * s * s + keeps_bias * x.a * s * s * x.e + decoder * s * s
    once = 8 * x.b * s + 2 * x.drop(s) + x.norm(s) + bias + decoder * x.hidden(s_enc)
    return per_layers + once


def activation_bytes(cfg: Config, encoder_length: int, decoder_length: int, recompute: str,
                     device: str = "cuda") -> float:
    """Bytes autograd keeps for the backward of D's stacks, per micro-batch on one rank, with
    ``recompute`` as ``model.recompute``: from the embedding's lookup to each stack's final norm and
    dropout (the LM head, its logits and the loss are the objective's and not counted). Elements of
    the run's precision (bf16 or fp32); TP splits heads and d_ff, sequence parallelism the ``[s, b,
    h]`` tensors; PP assumed even. Inputs without padding (span-corruption inputs are packed).

    Counted from what the layers keep (``model/spec.py``, ``attention.py``, ``norm.py``, Megatron's
    ``TransformerLayer``, ``MLP`` and linears) and checked against ``saved_tensors_hooks`` (distinct
    storages, parameters excluded) on CPU, where ``device="cpu"`` gives what torch's CPU kernels
    keep (tests/plan/test_activation_memory.py). ``device="cuda"`` (the dry run's) differs in the
    attention kernel (SDPA's memory-efficient kernel: no ``s x s`` tensors) and bool dropout masks;
    it cannot be measured without a GPU. Full recompute: what the checkpoints keep; the layer being
    recomputed during backward is extra (:func:`recomputed_layer_bytes`)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    x, m = _shapes(cfg, device), cfg.model
    total = (_stack(x, cfg, m.num_encoder_layers, encoder_length, encoder_length, False, recompute)
             + _stack(x, cfg, m.num_decoder_layers, decoder_length, encoder_length, True, recompute))
    return total / cfg.parallel.pipeline_model_parallel_size


def recomputed_layer_bytes(cfg: Config, encoder_length: int, decoder_length: int, device: str = "cuda") -> float:
    """What one layer holds while full recompute re-runs it in backward: a decoder layer's
    activations (an encoder layer's when there is no decoder)."""
    x, decoder = _shapes(cfg, device), cfg.model.num_decoder_layers > 0
    s = decoder_length if decoder else encoder_length
    return _layer(x, s, encoder_length, decoder, "none")


def describe_activations(cfg: Config, encoder_length: int, decoder_length: int) -> str:
    """The ``--dry-run`` line: activations per micro-batch under each ``model.recompute``."""
    parts = ", ".join(f"{r} {activation_bytes(cfg, encoder_length, decoder_length, r) / GIB:,.2f} GiB"
                      + (" (this config)" if r == cfg.model.recompute else "") for r in RECOMPUTE)
    return (f"D's activations kept for backward per micro-batch of {cfg.train.micro_batch_size} per rank "
            f"({'bf16' if uses_bf16(cfg) else 'fp32'}, GPU attention kernel, LM head and logits not counted): {parts}")
