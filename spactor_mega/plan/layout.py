"""Which encoder (E) and decoder (D) layers each pipeline stage holds, decided before any group.

The encoder-decoder pipeline (ARCHITECTURE.md, Parallelism) sends one packed tensor
``[s_enc + s_dec, b, h]`` through the non-interleaved 1F1B schedule. Stage order follows layer
order: all encoder layers come before all decoder layers, every layer sits on exactly one stage,
no stage is empty, and one stage may hold the end of the encoder and the start of the decoder.

The string form is ``parallel.pipeline_layout``: stages separated by ``|``, each ``E<n>``,
``D<n>`` or ``E<n>D<n>`` (e.g. ``"E6|E6|D4|D4|D4"`` or ``"E4|E2D2|D4"``). Without it, the layout
is balanced by the FLOPs model of :mod:`spactor_mega.plan.flops`, per phase of the curriculum
(:func:`config_layout`): in the hybrid phase stage 0 also runs G (inside its forward step) and
the last stage the RTD head, and the run rebuilds its stages for the SC-only balance at tau
(:func:`replans_at_tau`). One split for both phases costs too much at PP = 4: over a preset's run
(tau 120k of 500k steps, the slowest stage's FLOPs per phase) the best single split is 7.5%
(t5-base), 9.4% (t5-large) and 9.4% (t5-xl) slower than re-planning at tau (found by trying every
split); at PP = 2 the SC-balanced split is within 3.3-4.4% (docs/training/parallelism.md, Pipeline).

Pure Python (no torch): safe to call from config validation and ``--dry-run``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Optional

from spactor_mega.config import Config, ConfigError
from spactor_mega.curriculum import Phase, tau_bound
from spactor_mega.data.span_corruption import mlm_capacity, noise_counts, random_spans_helper
from spactor_mega.plan.engines import engine_spec
from spactor_mega.plan.flops import sample_flops

FIELD = "parallel.pipeline_layout"
DEFAULT_VOCAB_SIZE = 32128  # the padded T5 vocabulary, as ``plan.dry_run.describe`` assumes


@dataclass(frozen=True)
class StageLayout:
    """Global indices of the encoder and decoder layers one stage holds (either may be empty)."""

    encoder_layers: range
    decoder_layers: range

    @property
    def num_layers(self) -> int:
        return len(self.encoder_layers) + len(self.decoder_layers)

    def describe(self) -> str:
        parts = []
        if len(self.encoder_layers):
            parts.append(f"E{len(self.encoder_layers)}")
        if len(self.decoder_layers):
            parts.append(f"D{len(self.decoder_layers)}")
        return "".join(parts)


@dataclass(frozen=True)
class PipelineLayout:
    """The stages, in pipeline order. Build it with :func:`parse_layout` or :func:`balanced_layout`."""

    stages: tuple[StageLayout, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_encoder_layers(self) -> int:
        return sum(len(s.encoder_layers) for s in self.stages)

    @property
    def num_decoder_layers(self) -> int:
        return sum(len(s.decoder_layers) for s in self.stages)

    def describe(self) -> str:
        """The ``parallel.pipeline_layout`` string; :func:`parse_layout` reads it back."""
        return "|".join(s.describe() for s in self.stages)

    def stage_split(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """One ``((enc_start, enc_end), (dec_start, dec_end))`` pair of global layer ranges per
        stage (an absent stack is ``(0, 0)``): what :mod:`spactor_mega.model.stages` builds."""

        def bounds(r: range) -> tuple[int, int]:
            return (r.start, r.stop) if len(r) else (0, 0)

        return [(bounds(s.encoder_layers), bounds(s.decoder_layers)) for s in self.stages]

    @property
    def stage_holding_last_encoder_layer(self) -> Optional[int]:
        """The stage that applies the encoder's final norm (None if there are no encoder layers)."""
        found = None
        for i, s in enumerate(self.stages):
            if len(s.encoder_layers):
                found = i
        return found

    @property
    def first_decoder_stage(self) -> Optional[int]:
        """The first stage holding a decoder layer (None if there are no decoder layers)."""
        for i, s in enumerate(self.stages):
            if len(s.decoder_layers):
                return i
        return None


def _from_counts(counts: list[tuple[int, int]]) -> PipelineLayout:
    """Stages from per-stage (encoder, decoder) layer counts, numbering layers in order."""
    stages, e, d = [], 0, 0
    for ne, nd in counts:
        stages.append(StageLayout(range(e, e + ne), range(d, d + nd)))
        e, d = e + ne, d + nd
    return PipelineLayout(tuple(stages))


_STAGE = re.compile(r"(?:E(\d+))?(?:D(\d+))?")


def parse_layout(text: str, num_encoder_layers: int, num_decoder_layers: int) -> PipelineLayout:
    """Reads ``"E6|E6|D4|D4|D4"`` / ``"E4|E2D2|D4"``; raises :class:`ConfigError` naming the fault."""

    def fail(what: str) -> None:
        raise ConfigError(f"{FIELD}={text!r}: {what}")

    if not isinstance(text, str) or not text.strip():
        fail("is empty; write stages separated by '|', e.g. 'E6|E6|D4|D4|D4'")
    counts: list[tuple[int, int]] = []
    for i, token in enumerate(t.strip() for t in text.split("|")):
        if not token:
            fail(f"stage {i} is empty; every stage must hold at least one layer")
        match = _STAGE.fullmatch(token)
        if match is None:
            hint = (" (encoder layers come before decoder layers)"
                    if re.fullmatch(r"D\d+E\d+", token) else "")
            fail(f"stage {i} {token!r} is not E<n>, D<n> or E<n>D<n>{hint}")
        ne, nd = (int(g) if g is not None else 0 for g in match.groups())
        if (match.group(1) is not None and ne == 0) or (match.group(2) is not None and nd == 0):
            fail(f"stage {i} {token!r} has a zero layer count; leave that stack out of the stage")
        if ne and any(prev_d for _, prev_d in counts):
            fail(f"stage {i} {token!r} holds encoder layers after decoder layers of an earlier stage; "
                 "all encoder layers must come before all decoder layers")
        counts.append((ne, nd))
    total_e, total_d = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if total_e != num_encoder_layers:
        fail(f"holds {total_e} encoder layers but model.num_encoder_layers={num_encoder_layers}")
    if total_d != num_decoder_layers:
        fail(f"holds {total_d} decoder layers but model.num_decoder_layers={num_decoder_layers}")
    return _from_counts(counts)


@dataclass(frozen=True)
class LayerCosts:
    """Training FLOPs of one sample (``sample_flops`` units) per layer and per stage extra."""

    encoder_layer: float
    decoder_layer: float
    first_stage_extra: float  # embedding lookups (no matmul FLOPs) + what the caller adds (e.g. G)
    last_stage_extra: float  # LM head (+ what the caller adds, e.g. the RTD head before tau)


def layer_costs(cfg: Config, encoder_length: int, decoder_length: int, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                first_stage_extra_flops: float = 0.0, last_stage_extra_flops: float = 0.0) -> LayerCosts:
    """Per-layer costs read off :func:`sample_flops` (one layer / no layers), not re-derived here.

    The embedding lookup costs no matmul FLOPs in that model (MFU conventions count matmuls), so
    stage 0's extra is ``first_stage_extra_flops`` alone: pass G's cost there when G runs inside
    stage 0's forward step. The last stage always pays the LM head.
    """

    def discriminator(n_enc: int, n_dec: int, vocab: int) -> float:
        model = dataclasses.replace(cfg.model, num_encoder_layers=n_enc, num_decoder_layers=n_dec)
        one = dataclasses.replace(cfg, model=model)
        return sample_flops(one, encoder_length, decoder_length, vocab, 0).discriminator

    embedding = 0  # a lookup; the matmul-only FLOPs model prices it at zero
    return LayerCosts(
        encoder_layer=discriminator(1, 0, 0),
        decoder_layer=discriminator(0, 1, 0),
        first_stage_extra=embedding + first_stage_extra_flops,
        last_stage_extra=discriminator(0, 0, vocab_size) + last_stage_extra_flops,
    )


def stage_costs(layout: PipelineLayout, costs: LayerCosts) -> list[float]:
    """Cost of each stage of ``layout`` under ``costs``."""
    out = []
    for i, s in enumerate(layout.stages):
        c = len(s.encoder_layers) * costs.encoder_layer + len(s.decoder_layers) * costs.decoder_layer
        if i == 0:
            c += costs.first_stage_extra
        if i == layout.num_stages - 1:
            c += costs.last_stage_extra
        out.append(c)
    return out


@functools.lru_cache(maxsize=4096)
def balance(num_encoder_layers: int, num_decoder_layers: int, num_stages: int, costs: LayerCosts) -> PipelineLayout:
    """Exact min-max split of ``[E]*n_enc + [D]*n_dec`` into ``num_stages`` contiguous non-empty parts.

    Dynamic programming, O(p n^2): first the smallest possible maximum stage cost, then, among the
    splits reaching it, the one with the smallest sum of squared stage costs (deterministic, and it
    evens out the stages that are not the bottleneck). Memoised (its arguments and result are
    immutable): ``spactor plan`` validates and prices thousands of layouts that share a few splits,
    and this solve was three quarters of their time.
    """
    n = num_encoder_layers + num_decoder_layers
    p = num_stages
    if not 1 <= p <= n:
        raise ConfigError(f"parallel.pipeline_model_parallel_size={p} must be between 1 and the {n} "
                          "transformer layers of the model; use fewer stages")
    prefix = [0.0]
    for k in range(n):
        prefix.append(prefix[-1] + (costs.encoder_layer if k < num_encoder_layers else costs.decoder_layer))

    def cost(stage: int, i: int, j: int) -> float:  # layers [i, j) on ``stage``
        c = prefix[j] - prefix[i]
        if stage == 0:
            c += costs.first_stage_extra
        if stage == p - 1:
            c += costs.last_stage_extra
        return c

    inf = float("inf")

    def solve(score, combine, cap: float):
        # best[s][j]: best score of putting layers [0, j) on stages 0..s-1 (j >= s)
        best = [[inf] * (n + 1) for _ in range(p + 1)]
        cut = [[0] * (n + 1) for _ in range(p + 1)]
        best[0][0] = 0.0
        for s in range(1, p + 1):
            for j in range(s, n - (p - s) + 1):
                for i in range(s - 1, j):
                    if best[s - 1][i] == inf:
                        continue
                    c = cost(s - 1, i, j)
                    if c > cap:
                        continue
                    v = combine(best[s - 1][i], score(c))
                    if v < best[s][j]:
                        best[s][j], cut[s][j] = v, i
        return best[p][n], cut

    optimum, _ = solve(lambda c: c, max, inf)
    _, cut = solve(lambda c: c * c, lambda a, b: a + b, optimum)
    bounds, j = [n], n
    for s in range(p, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.reverse()
    counts = []
    for i, j in zip(bounds, bounds[1:]):
        ne = max(0, min(j, num_encoder_layers) - i)
        counts.append((ne, (j - i) - ne))
    return _from_counts(counts)


def balanced_layout(cfg: Config, num_stages: int, encoder_length: int, decoder_length: int, *,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, first_stage_extra_flops: float = 0.0,
                    last_stage_extra_flops: float = 0.0) -> PipelineLayout:
    """The layout minimising the most expensive stage under the FLOPs model (see :func:`balance`)."""
    costs = layer_costs(cfg, encoder_length, decoder_length, vocab_size=vocab_size,
                        first_stage_extra_flops=first_stage_extra_flops,
                        last_stage_extra_flops=last_stage_extra_flops)
    return balance(cfg.model.num_encoder_layers, cfg.model.num_decoder_layers, num_stages, costs)


def resolve_layout(cfg: Config, encoder_length: int, decoder_length: int, **balance_kwargs) -> PipelineLayout:
    """The layout to build: ``parallel.pipeline_layout`` if set, else :func:`balanced_layout`.

    Rejects, before any process group exists: PP > 1 on an engine without pipelines, more (virtual) stages than
    layers, and a layout string that does not match the model or the number of stages (PP x V,
    in virtual order when V > 1).
    ``balance_kwargs`` go to :func:`balanced_layout` (vocab size, extra stage-0 / last-stage FLOPs).
    """
    m, par = cfg.model, cfg.parallel
    pp, vp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    n_layers = m.num_encoder_layers + m.num_decoder_layers
    refusal = engine_spec(cfg.train.engine).plan.pipeline_refusal(cfg)
    if pp > 1 and refusal:
        raise ConfigError(refusal)
    if pp < 1:
        raise ConfigError(f"parallel.pipeline_model_parallel_size must be >= 1, got {pp}")
    if pp > n_layers:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} exceeds the {n_layers} transformer layers of the "
            f"model ({m.num_encoder_layers} encoder + {m.num_decoder_layers} decoder); use fewer stages")
    if pp * vp > n_layers:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} x parallel.virtual_pipeline_model_parallel_size={vp} "
            f"stages exceed the {n_layers} transformer layers of the model; use fewer virtual stages")
    if par.pipeline_layout:
        layout = parse_layout(par.pipeline_layout, m.num_encoder_layers, m.num_decoder_layers)
        if layout.num_stages != pp * vp:
            raise ConfigError(
                f"{FIELD}={par.pipeline_layout!r} has {layout.num_stages} stages but "
                f"parallel.pipeline_model_parallel_size={pp} x parallel.virtual_pipeline_model_parallel_size={vp} "
                f"= {pp * vp}; make them equal (or unset {FIELD})")
        return layout
    # Virtual stages are balanced one by one, in virtual order (a proxy: a rank's cost is the
    # sum of its V stages).
    return balanced_layout(cfg, pp * vp, encoder_length, decoder_length, **balance_kwargs)


def replans_at_tau(cfg: Config) -> bool:
    """Whether the run balances its stages for each phase and rebuilds them at tau: a pipeline,
    both phases and no given ``parallel.pipeline_layout`` (the optimizers' checkpoints hold their
    state under global parameter names, so it moves between stages)."""
    return (cfg.parallel.pipeline_model_parallel_size > 1 and not cfg.parallel.pipeline_layout
            and 0 < tau_bound(cfg.spactor) < cfg.train.steps)


def config_layout(cfg: Config, vocab_size: int = DEFAULT_VOCAB_SIZE, phase: Phase = Phase.SC_ONLY) -> PipelineLayout:
    """:func:`resolve_layout` at the config's own lengths (the encoder length and the decoder
    length its span corruption gives): the one layout validation, ``--dry-run`` and training use.
    ``phase`` HYBRID, when :func:`replans_at_tau` or the run never leaves the hybrid phase:
    balanced with G's FLOPs on stage 0 and the RTD head's on the last stage (per sample,
    :func:`~spactor_mega.plan.flops.sample_flops`)."""
    s = cfg.spactor
    encoder_length = cfg.data.encoder_seq_length
    raw_length, decoder_length = random_spans_helper(encoder_length, s.noise_density, s.mean_noise_span_length)
    extra = {}
    if phase is Phase.HYBRID and (replans_at_tau(cfg) or tau_bound(s) >= cfg.train.steps):
        _, spans = noise_counts(raw_length, s.noise_density, s.mean_noise_span_length)
        flops = sample_flops(cfg, encoder_length, decoder_length, vocab_size,
                             mlm_capacity(encoder_length, spans, s.mlm_fraction))
        extra = dict(first_stage_extra_flops=flops.generator, last_stage_extra_flops=flops.rtd_head)
    return resolve_layout(cfg, encoder_length, decoder_length, vocab_size=vocab_size, **extra)


def bubble_fraction(num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a step under 1F1B: ``(p - 1) / (v m + p - 1)`` (``v`` = 1: non-interleaved).

    With ``p`` equal stages and ``m`` micro-batches each stage is busy for ``m`` forward+backward
    slots out of ``m + p - 1`` (the warm-up and cool-down take ``p - 1`` slots), the same bubble
    as GPipe; 1F1B only bounds activation memory to ``p`` in-flight micro-batches. With ``v``
    virtual stages per rank a slot is ``1/v`` as long, so the warm-up and cool-down shrink by ``v``
    (Megatron's interleaved schedule). Ignores p2p time and unequal stages (the slowest stage
    sets the pace).
    """
    if num_stages < 1 or num_microbatches < 1 or virtual_stages < 1:
        raise ValueError(f"bubble_fraction needs num_stages, num_microbatches and virtual_stages >= 1, "
                         f"got {num_stages}, {num_microbatches}, {virtual_stages}")
    return (num_stages - 1) / (virtual_stages * num_microbatches + num_stages - 1)
