"""``spactor plan``: the layouts of a config on N GPUs, searched with the dry run's scale model.

The search space: TP (divisors of N up to a node: TP crosses no node), PP (divisors of N / TP, the
stages FLOPs-balanced as the trainer balances them), virtual stages (1, 2, 4 under PP > 1), the
micro-batch size (divisors of the global batch / DP), ``model.recompute``, sequence parallelism
(TP > 1) and the distributed optimizer (DP > 1); DP is the rest, the global batch the config's.
A field the caller pins keeps its value. Each layout is checked by :func:`~spactor_mega.plan.validate.validate`
(what ``spactor train`` refuses is dropped, counted by the field its message names), priced by
:func:`~spactor_mega.plan.scale.predict` and kept when its predicted per-rank memory fits
(:attr:`~spactor_mega.plan.scale.ScalePrediction.fits`, the dry run's verdict). The kept ones are
ranked by the run's mean step time: the hybrid phase's for the steps before tau, the SC-only
phase's after. NeMo's auto-configurator finds its layouts by trial runs; this prices them in
milliseconds each and runs nothing. Pure Python.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from spactor_mega.config import Config, ConfigError
from spactor_mega.curriculum import tau_bound
from spactor_mega.plan.layout import DEFAULT_VOCAB_SIZE
from spactor_mega.plan.memory import GIB, RECOMPUTE
from spactor_mega.plan.scale import ASSUMPTIONS, Hardware, ScalePrediction, predict
from spactor_mega.plan.validate import validate

TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"
VP = "parallel.virtual_pipeline_model_parallel_size"
MICRO = "train.micro_batch_size"
RECOMPUTE_FIELD = "model.recompute"
SP = "parallel.sequence_parallel"
DIST_OPT = "parallel.distributed_optimizer"
SEARCHED = (TP, PP, VP, MICRO, RECOMPUTE_FIELD, SP, DIST_OPT)
VIRTUAL_STAGES = (1, 2, 4)
# The scale model runs every matmul at one efficiency, which holds only for large ones (docs/scale.md): the
# search keeps micro-batches of at least this many encoder tokens (or a DP rank's whole share, if smaller)
MIN_MICRO_BATCH_TOKENS = 4096


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _get(cfg: Config, name: str) -> Any:
    section, field = name.split(".")
    return getattr(getattr(cfg, section), field)


def _micro_batch_sizes(share: int, encoder_length: int) -> list[int]:
    """The divisors of a DP rank's ``share`` of the batch of at least MIN_MICRO_BATCH_TOKENS tokens (the share if none is)."""
    return [d for d in _divisors(share) if d * encoder_length >= MIN_MICRO_BATCH_TOKENS] or [share]


def layouts(cfg: Config, world_size: int, hw: Hardware, pinned: frozenset[str] = frozenset()) -> Iterator[dict]:
    """Every combination of the searched fields for ``world_size`` GPUs, ``{field: value}``; a
    field in ``pinned`` keeps ``cfg``'s value."""

    def options(name: str, values) -> list:
        return [_get(cfg, name)] if name in pinned else list(values)

    layers = cfg.model.num_encoder_layers + cfg.model.num_decoder_layers
    batch = cfg.train.global_batch_size
    for tp in options(TP, (d for d in _divisors(world_size) if d <= hw.gpus_per_node)):
        for pp in options(PP, (d for d in _divisors(world_size // tp) if d <= layers) if world_size % tp == 0 else ()):
            dp = world_size // (tp * pp)
            for vp in options(VP, (v for v in VIRTUAL_STAGES if v == 1 or pp * v <= layers) if pp > 1 else (1,)):
                micro = _micro_batch_sizes(batch // dp, cfg.data.encoder_seq_length) if batch % dp == 0 else \
                    [cfg.train.micro_batch_size]  # validation refuses it, naming the global batch
                for micro_batch in options(MICRO, micro):
                    for recompute in options(RECOMPUTE_FIELD, RECOMPUTE):
                        for sp in options(SP, (False, True) if tp > 1 else (False,)):
                            for dist_opt in options(DIST_OPT, (False, True) if dp > 1 else (False,)):
                                yield {TP: tp, PP: pp, VP: vp, MICRO: micro_batch, RECOMPUTE_FIELD: recompute,
                                       SP: sp, DIST_OPT: dist_opt}


def configure(cfg: Config, settings: dict) -> Config:
    """``cfg`` with ``settings`` (``{field: value}``) in new copies of their sections; ``cfg`` is unchanged."""
    sections: dict[str, dict] = {}
    for name, value in settings.items():
        section, field = name.split(".")
        sections.setdefault(section, {})[field] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **f) for s, f in sections.items()})


@dataclass(frozen=True)
class Candidate:
    """A layout that validates, priced by the scale model."""

    settings: dict  # {field: value} of the searched fields
    config: Config
    prediction: ScalePrediction
    hybrid_steps: int  # of the run's train.steps: the rest are SC-only

    @property
    def mean_step_s(self) -> float:
        """The run's mean step time: the hybrid phase's for the steps before tau, the SC-only phase's after."""
        t, steps = self.prediction.times, self.config.train.steps
        return (self.hybrid_steps * t["hybrid"].step_s + (steps - self.hybrid_steps) * t["sc_only"].step_s) / steps

    @property
    def mfu(self) -> float:
        """The run's MFU: all its model FLOPs over all its time at the GPUs' peak."""
        t, steps, h = self.prediction.times, self.config.train.steps, self.hybrid_steps
        flops = h * t["hybrid"].model_flops + (steps - h) * t["sc_only"].model_flops
        sc = t["sc_only"]
        return flops / (self.mean_step_s * steps) / sc.world_size / (sc.peak_tflops * 1e12)

    @property
    def memory_bytes(self) -> float:
        return self.prediction.memory.total


@dataclass(frozen=True)
class Plan:
    fitting: list[Candidate]  # fastest first
    too_big: list[Candidate]  # valid, over the GPU's usable memory; least memory first
    refused: Counter  # validation's refusals by the field their message names first
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (the wall clock on a busy machine counts the other jobs too)

    @property
    def scored(self) -> int:
        return len(self.fitting) + len(self.too_big)

    def best(self, top: int) -> list[Candidate]:
        """The ``top`` fastest that fit, each layout (all but the micro-batch size) once, at its best micro-batch size."""
        out, seen = [], set()
        for c in self.fitting:
            layout = tuple(v for name, v in c.settings.items() if name != MICRO)
            if layout not in seen:
                seen.add(layout)
                out.append(c)
            if len(out) == top:
                break
        return out


_FIELD_NAME = re.compile(r"\b(?:model|generator|spactor|data|parallel|optim|train)\.\w+")


def plan(cfg: Config, world_size: int, hw: Hardware, pinned: frozenset[str] = frozenset(),
         vocab_size: Optional[int] = None) -> Plan:
    """Every layout of :func:`layouts` that validates, priced; split into those that fit ``hw``'s
    usable memory and those that do not."""
    if hw.memory_gib is None:
        raise ConfigError(f"--gpu {hw.gpu}: its memory is not known; give --gpu-memory-gib")
    if cfg.train.engine != "megatron":
        raise ConfigError(f"spactor plan prices the Megatron engine's step (the scale model's); train.engine is "
                          f"{cfg.train.engine}: use --train.engine megatron")
    vocab_size = vocab_size or cfg.model.vocab_size or DEFAULT_VOCAB_SIZE
    hybrid_steps = int(min(tau_bound(cfg.spactor), cfg.train.steps))
    start, cpu_start = time.perf_counter(), time.process_time()
    fitting, too_big, refused = [], [], Counter()
    for settings in layouts(cfg, world_size, hw, pinned):
        candidate_cfg = configure(cfg, settings)
        try:
            validate(candidate_cfg, world_size)
        except ConfigError as e:
            named = _FIELD_NAME.search(str(e))
            refused[named.group(0) if named else str(e)] += 1
            continue
        c = Candidate(settings, candidate_cfg, predict(candidate_cfg, world_size, hw, vocab_size), hybrid_steps)
        (fitting if c.prediction.fits else too_big).append(c)
    # equal predicted times (to 0.1 ms: without a pipeline the micro-batch size changes no FLOPs): the one needing
    # less memory first, as the estimate leaves out the LM-head logits, which grow with the micro-batch
    fitting.sort(key=lambda c: (round(c.mean_step_s, 4), c.memory_bytes))
    too_big.sort(key=lambda c: c.memory_bytes)
    return Plan(fitting, too_big, refused, time.perf_counter() - start, time.process_time() - cpu_start)


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def command(config_path: Optional[str], flags: list[tuple[str, str]], base: Config, candidate: Candidate) -> str:
    """The ``spactor train`` line that runs ``candidate``: the preset, the caller's own ``flags``
    (``(field, raw value)``), then each searched field whose value differs from ``base``'s."""
    words = ["spactor", "train"] + (["--config", config_path] if config_path else [])
    words += [w for name, raw in flags for w in (f"--{name}", raw)]
    given = {name for name, _ in flags}
    words += [w for name, value in candidate.settings.items() if name not in given and value != _get(base, name)
              for w in (f"--{name}", _flag_value(value))]
    return " ".join(words)


def _row(rank: str, c: Candidate) -> list[str]:
    s, t = c.settings, c.prediction.times
    layout = c.prediction.layout
    return [rank, str(s[TP]), str(s[PP]), str(s[VP]), str(layout.dp), f"{layout.microbatches} x {s[MICRO]}",
            s[RECOMPUTE_FIELD], "yes" if s[SP] else "no", "yes" if s[DIST_OPT] else "no",
            f"{c.memory_bytes / GIB:,.1f}", f"{t['sc_only'].step_s * 1e3:,.0f} / {t['hybrid'].step_s * 1e3:,.0f}",
            f"{c.mean_step_s * 1e3:,.0f}", f"{t['sc_only'].mfu:.1%} / {t['hybrid'].mfu:.1%}", f"{c.mfu:.1%}"]


HEADER = ["#", "TP", "PP", "V", "DP", "micro-batches", "recompute", "SP", "dist. opt.", "memory GiB",
          "step ms SC-only / hybrid", "run mean ms", "MFU SC-only / hybrid", "run MFU"]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def describe_plan(p: Plan, cfg: Config, world_size: int, hw: Hardware, top: int, config_path: Optional[str],
                  flags: list[tuple[str, str]]) -> list[str]:
    """``spactor plan``'s output. Raises ConfigError (one line) when no layout fits."""
    where = f"{world_size} x {hw.gpu}"
    refused = ", ".join(f"{name} {n}" for name, n in p.refused.most_common())
    if not p.fitting:
        smallest = (f"; the smallest needs {p.too_big[0].memory_bytes / GIB:,.1f} GiB "
                    f"({p.too_big[0].prediction.layout.describe()}, recompute {p.too_big[0].settings[RECOMPUTE_FIELD]})"
                    if p.too_big else f"; every layout was refused ({refused})")
        raise ConfigError(f"no layout fits {where} ({hw.usable_memory_bytes / GIB:,.1f} GiB usable per GPU){smallest}: "
                          "use more or larger GPUs, or a smaller model")
    steps, hybrid = cfg.train.steps, p.fitting[0].hybrid_steps
    lines = [f"hardware: {hw.describe()}",
             "scale model assumptions (docs/scale.md):", *(f"  - {a}" for a in ASSUMPTIONS),
             f"searched TP, PP (balanced stages), V, micro-batch size, recompute, sequence parallelism and the "
             f"distributed optimizer on {where}, global batch {cfg.train.global_batch_size}: {p.scored:,} layouts "
             f"priced in {p.seconds:.1f} s ({p.cpu_seconds:.1f} s of CPU), {len(p.fitting):,} fit, {len(p.too_big):,} do not; "
             f"{sum(p.refused.values()):,} refused by validation" + (f" ({refused})" if refused else ""),
             f"ranked by the run's mean step time ({hybrid:,} hybrid-phase steps of {steps:,}, then SC-only); "
             f"each layout at its best micro-batch size (of >= {MIN_MICRO_BATCH_TOKENS:,} tokens), the best "
             f"{min(top, len(p.fitting))} with the command that runs each on {world_size} GPU{'s' if world_size > 1 else ''} (launch: docs/clusters.md):"]
    best = p.best(top)
    table = _table([HEADER] + [_row(str(i + 1), c) for i, c in enumerate(best)])
    lines += [table[0]]
    for i, c in enumerate(best):
        lines += [table[i + 1], "    " + command(config_path, flags, cfg, c)]
    return lines
