"""The scale model of ``spactor train --dry-run``: for a preset, its layout (TP x PP x DP) and a world
size, per-rank memory, the communication of a step by kind of parallelism, and a predicted step
time and MFU on declared hardware (a GPU's dense peak, link bandwidths).

It prices the Megatron engine's step with the FLOPs model (:mod:`spactor_mega.plan.flops`), the
stage layout (:mod:`spactor_mega.plan.layout`), the activation estimate
(:mod:`spactor_mega.plan.memory`) and the engine's model-state plan. Its assumptions are
:data:`ASSUMPTIONS`, printed with it. Absolute times rest on the declared efficiency and link
figures; the ratios (recompute's extra compute, the pipeline bubble, the DP volume) are what
``tools/bench_scale.py`` and ``tests/plan/test_scale.py`` check against CPU runs. Pure Python.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod
from typing import Optional, Sequence

from spactor_mega.config import Config, ConfigError
from spactor_mega.curriculum import Phase
from spactor_mega.data.span_corruption import mlm_capacity, noise_counts, random_spans_helper
from spactor_mega.plan.derived import generator_num_layers
from spactor_mega.plan.engines import megatron as megatron_plan
from spactor_mega.plan.flops import attention_score_flops, format_flops, sample_flops
from spactor_mega.plan.inventory import count, generator_parameter_shapes, rtd_head_parameter_shapes, t5_parameter_shapes
from spactor_mega.plan.layout import PipelineLayout, config_layout, layer_costs, stage_costs
from spactor_mega.plan.memory import GIB, RECOMPUTE, activation_bytes, recomputed_layer_bytes
from spactor_mega.plan.mfu import device_peak_tflops, device_row

ASSUMPTIONS = (
    "compute: the FLOPs model's matmul FLOPs, plus what recompute repeats, run at the declared efficiency x the "
    "GPU's dense peak; all other work (norms, softmax, elementwise, the optimizer step) is folded into that efficiency",
    "TP: ring all-reduces (all-gather + reduce-scatter with sequence parallelism) of [s, b, h] activations: per "
    "encoder layer 2 in forward and 2 in backward, per decoder layer 3 and 3 plus the encoder-output gradient of its "
    "cross-attention, again the forward ones under full recompute; the vocab-parallel embedding and LM head once; "
    "G's row split and MLM head in the hybrid phase; on the critical path",
    "PP: one [s_enc + s_dec, b, h] tensor per micro-batch, stage boundary and direction (1/TP with sequence "
    "parallelism), on the critical path; 1F1B step = sum of the stages' times + (m - 1) x the slowest (interleaved: "
    "the fill shrinks by V); G runs inside stage 0's forward step",
    "DP: the engine's fp32 gradient buffers all-reduced by ring, or with the distributed optimizer reduce-scattered "
    "and the parameters all-gathered in their dtype; exposed after the step's last backward, or with "
    "overlap_grad_reduce / overlap_param_gather hidden behind one micro-batch's backward / forward; G's and the RTD "
    "head's gradients always all-reduced (G's over TP x DP), overlapped only at TP = 1 (the engine's choices)",
    "links: a group whose ranks fit in a node runs at the NVLink bandwidth, one spanning nodes at the node's network "
    "bandwidth / GPUs per node; ranks are ordered TP, DP, PP (Megatron's order, TP innermost); no latency terms",
    "memory: model states from the engine's plan (bf16 params, fp32 grads and masters); D's activations as "
    "plan/memory.py counts what autograd keeps (the GPU's attention kernel, the run's precision) for the stage's "
    "own layers (G's too on stage 0 before tau), times the micro-batches in flight (1F1B: min(m, PP - stage)), "
    "plus one layer being recomputed under full recompute; LM-head logits, communication buffers and "
    "fragmentation not counted",
)


# (name fragment, GiB of memory per GPU: the total nvidia-smi reports, MiB / 1024), the more specific names first as in
# plan/mfu.py's PEAK_TFLOPS. From the datasheets' 80 GB (A100 80GB, H100 SXM and PCIe), 94 GB (H100 NVL) and
# 141 GB (H200) as their drivers report them (81,920, 81,559, 95,830 and 143,771 MiB). GH200 comes with 96 or
# 144 GB: no default, give --gpu-memory-gib (so is an A100 40GB's).
GPU_MEMORY_GIB: tuple[tuple[str, Optional[float]], ...] = (
    ("GH200", None),
    ("H200", 140.4),
    ("H100 NVL", 93.6),
    ("H100 PCIe", 79.6),
    ("H100", 79.6),
    ("A100", 80.0),
)


def device_memory_gib(gpu: str) -> Optional[float]:
    """:data:`GPU_MEMORY_GIB`'s figure for ``gpu`` (None: not known)."""
    row = device_row(gpu, GPU_MEMORY_GIB)
    return None if row is None else row[1]


@dataclass(frozen=True)
class Hardware:
    """What the model runs on: a GPU's dense peak in the run's precision, the fraction of it the
    model's FLOPs reach, the links (GB/s each GPU, or each node, sends one way), and its memory
    less a headroom kept free for what the memory estimate does not count (LM-head logits,
    communication buffers, the CUDA context, fragmentation: RankMemory counts model states and
    activations only)."""

    gpu: str
    peak_tflops: float
    efficiency: float = 0.5
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0  # per GPU, one direction (H100 SXM: NVLink 4, 900 GB/s both ways)
    network_gbs: float = 400.0  # per node, one direction (8 x 400 Gb/s InfiniBand)
    memory_gib: Optional[float] = None  # per GPU; None: not known, nothing is said to fit or not
    memory_headroom: float = 0.1  # fraction of memory_gib kept free

    def link(self, span: int) -> tuple[str, float]:
        """(name, GB/s per rank) of a group covering ``span`` consecutive ranks."""
        if span <= self.gpus_per_node:
            return "NVLink", self.nvlink_gbs
        return "network", self.network_gbs / self.gpus_per_node

    @property
    def usable_memory_bytes(self) -> Optional[float]:
        """What a rank's model states and activations may take: the memory less the headroom."""
        return None if self.memory_gib is None else self.memory_gib * GIB * (1 - self.memory_headroom)

    def describe(self) -> str:
        memory = ("memory not known (give --gpu-memory-gib)" if self.memory_gib is None else
                  f"{self.memory_gib:g} GiB per GPU less {self.memory_headroom:.0%} headroom = "
                  f"{self.usable_memory_bytes / GIB:,.1f} GiB for model states and activations")
        return (f"{self.gpu} {self.peak_tflops:g} TFLOP/s dense peak at {self.efficiency:.0%} efficiency, "
                f"{self.gpus_per_node} GPUs per node, NVLink {self.nvlink_gbs:g} GB/s per GPU, "
                f"network {self.network_gbs:g} GB/s per node, {memory}")


def hardware(gpu: str, bf16: bool = True, peak_tflops: Optional[float] = None, memory_gib: Optional[float] = None,
             **links) -> Hardware:
    """:class:`Hardware` for a GPU of :data:`spactor_mega.plan.mfu.PEAK_TFLOPS` (or any name with
    ``peak_tflops``), its memory from :data:`GPU_MEMORY_GIB` unless ``memory_gib`` is given;
    ``links``: the other fields of :class:`Hardware`."""
    peak = device_peak_tflops(gpu, bf16, peak_tflops)
    if peak is None:
        raise ConfigError(f"--gpu {gpu!r}: no known peak; name A100, H100, H100 PCIe or H200, or set train.peak_tflops")
    return Hardware(gpu=gpu, peak_tflops=peak, memory_gib=memory_gib or device_memory_gib(gpu), **links)


@dataclass(frozen=True)
class Layout:
    """How a world of GPUs runs the config: sizes, micro-batches per step per DP rank, stages."""

    tp: int
    pp: int
    dp: int
    vp: int
    micro_batch_size: int
    microbatches: int
    stages: PipelineLayout  # PP x V stages in virtual order (rank r holds r, r + PP, ...)
    sequence_parallel: bool

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank_stages(self, rank: int) -> list[int]:
        """The (virtual) stages pipeline rank ``rank`` holds."""
        return list(range(rank, self.pp * self.vp, self.pp))

    def describe(self) -> str:
        v = f" x V {self.vp}" if self.vp > 1 else ""
        return (f"TP {self.tp} x PP {self.pp}{v} x DP {self.dp} = {self.world_size} GPUs, {self.microbatches} "
                f"micro-batch(es) of {self.micro_batch_size} per step per DP rank, stages {self.stages.describe()}"
                + (", sequence parallel" if self.sequence_parallel else ""))


@dataclass(frozen=True)
class Traffic:
    """One kind of communication in a step, on the rank that sends the most of it."""

    parallelism: str  # "TP", "PP", "DP" (D's), "DP (G)", "DP (RTD head)"
    collective: str
    payload_bytes: float  # the full tensors handed to the calls (spactor_mega.parallel.comm_count's convention)
    wire_bytes: float  # what the rank sends: payload x the ring's factor
    group_size: int
    link: str
    seconds: float  # wire / link bandwidth
    exposed_seconds: float  # what the step waits for


@dataclass(frozen=True)
class RankMemory:
    """Model states and activations (bytes) of the rank of one pipeline position (hybrid phase)."""

    rank: int
    states: dict[str, float]  # params / grads / optimizer
    activations: dict[str, float]  # by model.recompute, for the micro-batches in flight
    in_flight: float
    recompute: str  # the config's

    @property
    def total(self) -> float:
        return sum(self.states.values()) + self.activations[self.recompute]


@dataclass(frozen=True)
class StepTime:
    """Predicted time of one step of a phase, split by what the slowest pipeline rank does."""

    phase: str
    compute_s: float
    tp_s: float
    pp_s: float
    bubble_s: float
    dp_s: float  # exposed
    rank_idle: tuple[float, ...]  # each pipeline rank's idle fraction of the schedule
    model_flops: float  # per step, the FLOPs model's (no recompute): MFU's numerator
    world_size: int
    peak_tflops: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_s + self.pp_s + self.bubble_s + self.dp_s

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_s / self.world_size / (self.peak_tflops * 1e12)


@dataclass(frozen=True)
class ScalePrediction:
    layouts: dict[str, Layout]  # "hybrid" / "sc_only": a run that re-plans at tau has two
    hardware: Hardware
    memory: RankMemory  # the rank holding the most
    traffic: dict[str, list[Traffic]]  # "hybrid" / "sc_only" -> per kind, as configured
    distributed_optimizer: bool  # as configured
    optimizer: str  # optim.optimizer (the distributed optimizer takes AdamW only)
    traffic_other_optimizer: list[Traffic]  # SC-only DP traffic with distributed_optimizer flipped
    times: dict[str, StepTime]  # "hybrid", "sc_only"

    @property
    def layout(self) -> Layout:
        return self.layouts["sc_only"]

    @property
    def fits(self) -> Optional[bool]:
        """Whether the rank holding the most fits the GPU's usable memory (None: memory not known):
        the dry run's verdict, and the planner's filter."""
        usable = self.hardware.usable_memory_bytes
        return None if usable is None else self.memory.total <= usable


# ---- pieces the bench and tests check one by one --------------------------------------------------


def pipeline_schedule(rank_seconds: Sequence[float], microbatches: int, virtual: int = 1) -> tuple[float, list[float]]:
    """(step seconds, idle fraction of each rank) of a 1F1B schedule whose pipeline rank r needs
    ``rank_seconds[r]`` per micro-batch (forward + backward of all its chunks).

    Non-interleaved: the first micro-batch passes every stage, then the slowest sets the pace,
    ``sum(R) + (m - 1) max(R)``; with V chunks per rank the fill takes 1/V of that,
    ``sum(R) / V + (m - 1/V) max(R)``. Equal stages give :func:`~spactor_mega.plan.layout.bubble_fraction`.
    """
    m, v, slowest = microbatches, virtual, max(rank_seconds)
    step = sum(rank_seconds) / v + (m - 1 / v) * slowest
    return step, [1.0 - m * r / step for r in rank_seconds]


def recompute_flops(cfg: Config, encoder_layers: int, decoder_layers: int, encoder_length: int,
                    decoder_length: int, recompute: str) -> float:
    """Training FLOPs per sample that ``recompute`` adds on a stage holding these layers of
    ``cfg.model``: full repeats the forward of the layers it checkpoints (uniform: all; block:
    ``model.recompute_num_layers`` of each stack on the stage), selective the core attention's."""
    m = cfg.model
    se, sd, inner = encoder_length, decoder_length, m.num_heads * m.d_kv
    if recompute == "none":
        return 0.0
    if recompute == "selective":
        return (encoder_layers * attention_score_flops(se, se, inner)
                + decoder_layers * (attention_score_flops(sd, sd, inner) + attention_score_flops(sd, se, inner)))
    if m.recompute_method == "block":
        encoder_layers = min(encoder_layers, m.recompute_num_layers)
        decoder_layers = min(decoder_layers, m.recompute_num_layers)
    costs = layer_costs(cfg, se, sd, vocab_size=0)
    return (encoder_layers * costs.encoder_layer + decoder_layers * costs.decoder_layer) / 3  # one more forward


def dp_traffic(params: int, dp: int, distributed_optimizer: bool, param_bytes: int,
               span: int, hw: Hardware, label: str = "DP") -> list[Traffic]:
    """One step's gradient (and parameter) collectives over a DP group of ``dp`` ranks spanning
    ``span`` consecutive ranks, for ``params`` parameters on this rank (fp32 gradient buffers).
    ``exposed_seconds`` is the whole time: the caller hides what overlap hides."""
    if dp == 1:
        return []
    link, gbs = hw.link(span)
    ring = (dp - 1) / dp

    def traffic(collective: str, payload: float, factor: float) -> Traffic:
        seconds = payload * factor / (gbs * 1e9)
        return Traffic(label, collective, payload, payload * factor, dp, link, seconds, seconds)

    if not distributed_optimizer:
        return [traffic("all-reduce", 4.0 * params, 2 * ring)]
    return [traffic("reduce-scatter", 4.0 * params, ring), traffic("all-gather", float(param_bytes * params), ring)]


# ---- the model -----------------------------------------------------------------------------------

PHASES = {"hybrid": Phase.HYBRID, "sc_only": Phase.SC_ONLY}


def scale_layout(cfg: Config, world_size: int, vocab_size: int, phase: Phase = Phase.SC_ONLY) -> Layout:
    """The layout ``cfg`` runs ``phase`` with on ``world_size`` GPUs (its stages: the run's own)."""
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    return Layout(tp=tp, pp=pp, dp=dp, vp=p.virtual_pipeline_model_parallel_size,
                  micro_batch_size=t.micro_batch_size, microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                  stages=config_layout(cfg, vocab_size, phase), sequence_parallel=p.sequence_parallel)


def _with_layers(cfg: Config, encoder_layers: int, decoder_layers: int, tp: int = 1, **model) -> Config:
    """``cfg`` with a model of these layers on one pipeline stage of TP size ``tp`` (per-stage estimates)."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, num_encoder_layers=encoder_layers,
                                       num_decoder_layers=decoder_layers, **model),
        parallel=dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                     sequence_parallel=cfg.parallel.sequence_parallel and tp > 1))


def _generator_config(cfg: Config) -> Config:
    """G as a model of its own: encoder layers of G's heads and d_ff, not tensor-split."""
    g, m = cfg.generator, cfg.model
    return _with_layers(cfg, generator_num_layers(cfg), 0, num_heads=g.num_heads or m.num_heads, d_ff=g.d_ff or m.d_ff)


def stage_parameters(cfg: Config, layout: Layout, stage: int, vocab_size: int) -> int:
    """D's parameters one TP rank of (virtual) ``stage`` holds: its layers, the embedding on the first
    stage, the LM head (or a tied head's copy of the embedding) on the last, each stack's bias table and final norm where it has layers;
    everything but the norms split by TP."""
    s = layout.stages.stages[stage]
    ne, nd = len(s.encoder_layers), len(s.decoder_layers)
    keep = {"embedding.weight": stage == 0, "lm_head.weight": stage == layout.stages.num_stages - 1}
    split = replicated = 0
    for name, shape in t5_parameter_shapes(_with_layers(cfg, ne, nd).model, vocab_size).items():
        stack = name.split(".")[0]
        if keep.get(name, (ne if stack == "encoder" else nd) > 0):
            if "layernorm" in name:
                replicated += prod(shape)
            else:
                split += prod(shape)
    last = layout.stages.num_stages - 1
    if cfg.model.tie_word_embeddings and stage == last != 0:  # the last stage's copy of the tied embedding
        split += vocab_size * cfg.model.d_model
    return split // layout.tp + replicated


def sample_lengths(cfg: Config) -> tuple[int, int, int]:
    """Encoder length, decoder length, MLM positions per sample."""
    s = cfg.data.encoder_seq_length
    raw, decoder = random_spans_helper(s, cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length)
    _, spans = noise_counts(raw, cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length)
    return s, decoder, mlm_capacity(s, spans, cfg.spactor.mlm_fraction)


def _stage_activations(cfg: Config, layout: Layout, stage: int, se: int, sd: int, recompute: str) -> float:
    """Activation bytes (plan/memory.py's, in the run's precision) of one micro-batch on one rank
    for the layers of ``stage``."""
    s = layout.stages.stages[stage]
    stage_cfg = _with_layers(cfg, len(s.encoder_layers), len(s.decoder_layers), layout.tp)
    total = activation_bytes(stage_cfg, se, sd, recompute)
    if recompute == "full":  # the layer being recomputed holds all of its activations
        total += recomputed_layer_bytes(stage_cfg, se, sd)
    return total


def _in_flight(layout: Layout, rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak, in units of the
    rank's whole set of chunks (Megatron's warm-up count + 1)."""
    p, v, m = layout.pp, layout.vp, layout.microbatches
    if v == 1:
        return min(m, p - rank)
    return min(m * v, (p - rank - 1) * 2 + (v - 1) * p + 1) / v


@dataclass(frozen=True)
class _RankWork:
    """Per micro-batch on one pipeline rank: compute seconds, TP payload bytes, p2p seconds."""

    compute_s: float
    tp_bytes: float
    p2p_s: float


def predict(cfg: Config, world_size: int, hw: Hardware, vocab_size: int = 32128) -> ScalePrediction:
    """The scale model for ``cfg`` on ``world_size`` GPUs of ``hw`` (assumptions: :data:`ASSUMPTIONS`)."""
    bf16 = cfg.train.precision != "fp32"  # auto: bf16 on every GPU the peak table knows
    act_bytes = 2 if bf16 else 4
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16" if bf16 else "fp32"))
    se, sd, mlm = sample_lengths(cfg)
    flops = sample_flops(cfg, se, sd, vocab_size, mlm)
    g_cfg = _generator_config(cfg)
    g_layers = g_cfg.model.num_encoder_layers
    g_params = count(generator_parameter_shapes(cfg))
    rtd_params = count(rtd_head_parameter_shapes(cfg.model.d_model))
    recompute = cfg.model.recompute
    flops_per_s = hw.peak_tflops * 1e12 * hw.efficiency
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    tp_link, tp_gbs = hw.link(tp)
    pp_link, pp_gbs = hw.link(world_size if pp > 1 else 1)
    tp_ring = 2 * (tp - 1) / tp
    b = cfg.train.micro_batch_size
    token_bytes = b * cfg.model.d_model * act_bytes  # one token of a [s, b, h] activation
    p2p_bytes = (se + sd) * token_bytes / (tp if par.sequence_parallel else 1)

    def stage_work(lay: Layout, costs: list[float], stage: int, hybrid: bool) -> _RankWork:
        s = lay.stages.stages[stage]
        ne, nd = len(s.encoder_layers), len(s.decoder_layers)
        last = lay.stages.num_stages - 1
        work = costs[stage] + recompute_flops(cfg, ne, nd, se, sd, recompute)
        full = recompute == "full"
        tokens = ne * (4 + 2 * full) * se + nd * ((6 + 3 * full) * sd + se)
        tokens += (se + sd) * (stage == 0) + sd * (stage == last)  # vocab-parallel embedding; LM head
        if hybrid and stage == last:
            work += flops.rtd_head
        if hybrid and stage == 0:
            work += flops.generator + recompute_flops(g_cfg, g_layers, 0, se, sd, recompute)
            tokens += 2 * se + 2 * mlm  # G's embedding and row split; its row gather and MLM head
        hops = (stage > 0) + (stage < last)
        return _RankWork(work * b / tp / flops_per_s, tokens * token_bytes if tp > 1 else 0.0,
                         hops * p2p_bytes / (pp_gbs * 1e9))

    def with_overlap(traffic: list[Traffic], compute_per_microbatch: float) -> list[Traffic]:
        """DP traffic less what one micro-batch's backward (gradients) or forward (parameter
        gather) hides under the overlap flags (G's and the head's: only at TP = 1, as the engine does)."""
        out = []
        for t in traffic:
            hidden = 0.0
            if t.parallelism == "DP" or tp == 1:
                if t.collective in ("all-reduce", "reduce-scatter") and par.overlap_grad_reduce:
                    hidden = compute_per_microbatch * 2 / 3
                elif t.collective == "all-gather" and par.overlap_param_gather:
                    hidden = compute_per_microbatch / 3
            out.append(dataclasses.replace(t, exposed_seconds=max(0.0, t.seconds - hidden)))
        return out

    times, traffic, layouts, d_params = {}, {}, {}, {}
    for phase, hybrid in (("hybrid", True), ("sc_only", False)):
        lay = layouts[phase] = scale_layout(cfg, world_size, vocab_size, PHASES[phase])
        m, ranks = lay.microbatches, range(pp)
        costs = stage_costs(lay.stages, layer_costs(cfg, se, sd, vocab_size=vocab_size))  # D's, per sample
        work = [stage_work(lay, costs, s, hybrid) for s in range(lay.stages.num_stages)]
        per_rank = [_RankWork(*(sum(getattr(work[s], f.name) for s in lay.rank_stages(r))
                                for f in dataclasses.fields(_RankWork))) for r in ranks]
        tp_s = [w.tp_bytes * tp_ring / (tp_gbs * 1e9) for w in per_rank]
        total = [w.compute_s + t + w.p2p_s for w, t in zip(per_rank, tp_s)]
        schedule, idle = pipeline_schedule(total, m, lay.vp)
        slow = max(ranks, key=lambda r: total[r])

        d_params[phase] = [sum(stage_parameters(cfg, lay, s, vocab_size) for s in lay.rank_stages(r)) for r in ranks]
        rank_dp = []
        for r in ranks:
            dp_r = dp_traffic(d_params[phase][r], dp, par.distributed_optimizer, act_bytes, tp * dp, hw)
            if hybrid and 0 in lay.rank_stages(r):
                dp_r += dp_traffic(g_params, dp * tp, False, act_bytes, tp * dp, hw, label="DP (G)")
            if hybrid and lay.stages.num_stages - 1 in lay.rank_stages(r):
                dp_r += dp_traffic(rtd_params, dp, False, act_bytes, tp * dp, hw, label="DP (RTD head)")
            rank_dp.append(with_overlap(dp_r, per_rank[r].compute_s))

        times[phase] = StepTime(
            phase, compute_s=m * per_rank[slow].compute_s, tp_s=m * tp_s[slow], pp_s=m * per_rank[slow].p2p_s,
            bubble_s=schedule - m * total[slow], dp_s=max(sum(t.exposed_seconds for t in d) for d in rank_dp),
            rank_idle=tuple(idle),
            model_flops=(flops.hybrid if hybrid else flops.sc_only) * cfg.train.global_batch_size,
            world_size=world_size, peak_tflops=hw.peak_tflops)
        kinds = []
        if tp > 1:
            r = max(ranks, key=lambda r: per_rank[r].tp_bytes)
            payload = m * per_rank[r].tp_bytes
            kinds.append(Traffic("TP", "all-gather + reduce-scatter" if par.sequence_parallel else "all-reduce",
                                 payload, payload * tp_ring, tp, tp_link, m * tp_s[r], m * tp_s[r]))
        if pp > 1:
            sends = (2 if pp > 2 else 1) * lay.vp * m
            kinds.append(Traffic("PP", "send/recv", sends * p2p_bytes, sends * p2p_bytes, 2, pp_link,
                                 sends * p2p_bytes / (pp_gbs * 1e9), m * per_rank[slow].p2p_s))
        kinds += max(rank_dp, key=lambda d: sum(t.payload_bytes for t in d))
        traffic[phase] = kinds

    busiest = max(d_params["sc_only"])
    other = dp_traffic(busiest, dp, not par.distributed_optimizer, act_bytes, tp * dp, hw)
    return ScalePrediction(layouts=layouts, hardware=hw,
                           memory=_memory(cfg, layouts["hybrid"], d_params["hybrid"], g_cfg, g_params, rtd_params, se, sd),
                           traffic=traffic, distributed_optimizer=par.distributed_optimizer, optimizer=cfg.optim.optimizer,
                           traffic_other_optimizer=other, times=times)


def _memory(cfg: Config, lay: Layout, d_params: list[int], g_cfg: Config, g_params: int, rtd_params: int,
            se: int, sd: int) -> RankMemory:
    """The pipeline rank whose model states plus activations (the config's recompute, hybrid phase)
    are the largest. G's and the head's states are never sharded (the engine keeps them off the
    distributed optimizer)."""
    aux_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, distributed_optimizer=False))
    best = None
    for rank in range(lay.pp):
        stages = lay.rank_stages(rank)
        states = megatron_plan.model_state_bytes(cfg, d_params[rank], lay.dp)["gpu"]
        aux = g_params * (0 in stages) + rtd_params * (lay.stages.num_stages - 1 in stages)
        if aux:
            extra = megatron_plan.model_state_bytes(aux_cfg, aux, lay.dp)["gpu"]
            states = {k: states[k] + extra[k] for k in states}
        in_flight = _in_flight(lay, rank)
        acts = {}
        for mode in RECOMPUTE:
            per_microbatch = sum(_stage_activations(cfg, lay, s, se, sd, mode) for s in stages)
            if 0 in stages:  # G: whole layers on 1/TP of the rows
                per_microbatch += activation_bytes(g_cfg, se, 1, mode) / lay.tp
            acts[mode] = per_microbatch * in_flight
        memory = RankMemory(rank, states, acts, in_flight, cfg.model.recompute)
        if best is None or memory.total > best.total:
            best = memory
    return best


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.{1 if seconds < 1 else 0}f} ms"


def describe_scale(prediction: ScalePrediction) -> list[str]:
    """The ``--dry-run`` lines of the scale model."""
    p, mem = prediction, prediction.memory
    lines = [f"scale model on {p.hardware.describe()}; assumptions:",
             *(f"  - {a}" for a in ASSUMPTIONS),
             f"  layout: {p.layout.describe()}"]
    if p.layouts["hybrid"].stages != p.layout.stages:
        lines.append(f"  hybrid phase stages (re-planned at tau): {p.layouts['hybrid'].stages.describe()}")
    acts = ", ".join(f"{mode} {mem.activations[mode] / GIB:,.2f}" + (" (this config)" if mode == mem.recompute else "")
                     for mode in RECOMPUTE)
    states = ", ".join(f"{k} {v / GIB:,.2f}" for k, v in mem.states.items())
    lines.append(f"  memory of pipeline rank {mem.rank} (the largest, hybrid phase): model states "
                 f"{sum(mem.states.values()) / GIB:,.2f} GiB ({states}); activations of {mem.in_flight:g} "
                 f"micro-batch(es) in flight: {acts} GiB; total {mem.total / GIB:,.2f} GiB")
    if p.fits is not None:
        lines.append(f"  fits the GPU: {'yes' if p.fits else 'NO'}, {mem.total / GIB:,.2f} of "
                     f"{p.hardware.usable_memory_bytes / GIB:,.2f} GiB ({p.hardware.memory_gib:g} GiB less "
                     f"{p.hardware.memory_headroom:.0%} headroom)")
    for phase, label in (("sc_only", "SC-only phase"), ("hybrid", "hybrid phase")):
        kinds = "; ".join(f"{t.parallelism} {t.collective} {_gb(t.payload_bytes)} (sends {_gb(t.wire_bytes)} over "
                          f"{t.link}, {_ms(t.seconds)}, exposed {_ms(t.exposed_seconds)})" for t in p.traffic[phase])
        lines.append(f"  communication per step per rank, {label}: {kinds or 'none (one GPU)'}")
    if p.traffic_other_optimizer:
        kinds = "; ".join(f"{t.collective} {_gb(t.payload_bytes)} (sends {_gb(t.wire_bytes)}, {_ms(t.seconds)})"
                          for t in p.traffic_other_optimizer)
        which = "without" if p.distributed_optimizer else "with"
        note = " (needs optim.optimizer adamw)" if p.optimizer != "adamw" else ""
        lines.append(f"  DP {which} the distributed optimizer{note}: {kinds}")
    for phase, label in (("sc_only", "SC-only phase"), ("hybrid", "hybrid phase")):
        t = p.times[phase]
        lines.append(f"  step time, {label}: {_ms(t.step_s)} = compute {_ms(t.compute_s)} + TP {_ms(t.tp_s)} + "
                     f"PP {_ms(t.pp_s)} + bubble {_ms(t.bubble_s)} + DP {_ms(t.dp_s)} (exposed); "
                     f"{format_flops(t.model_flops)} per step, MFU {t.mfu:.1%}")
    return lines
