"""The SpacTor curriculum: which phase a training step is in, and where tau is.

``Phase.HYBRID`` (steps < tau): MLM masking, generator G, RTD head and span corruption.
``Phase.SC_ONLY`` (steps >= tau): span corruption only; a step costs what plain T5 costs.
``tau = 0`` is plain T5, ``tau = inf`` the hybrid throughout. ("Stage" in this project means a
pipeline stage only.)

``spactor.tau: auto`` (:class:`AutoTau`): tau is ``auto_tau.max_steps`` until a signal measured
every ``auto_tau.interval`` steps (:mod:`spactor_mega.training.tau_signals`) has stayed past its
threshold for ``auto_tau.patience`` measurements at or after ``auto_tau.min_steps``; then tau is
the step of that measurement. The decision reads only values every rank holds alike (means over
every rank of fixed held-out batches), so every layout decides the same; its state travels in
checkpoints (``run.json``), so a resumed run decides as the uninterrupted one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional


class Phase(enum.Enum):
    HYBRID = 1
    SC_ONLY = 2


def phase_at(step: int, tau: float) -> Phase:
    """Phase of the (0-based) optimizer step ``step``."""
    return Phase.HYBRID if step < tau else Phase.SC_ONLY


def tau_bound(spactor_cfg) -> float:
    """A fixed ``spactor.tau``, or for ``auto`` the latest tau can be (``auto_tau.max_steps``): what
    plans made before the run (FLOPs, memory, layout, --dry-run) assume."""
    return float(spactor_cfg.auto_tau.max_steps) if spactor_cfg.tau == "auto" else float(spactor_cfg.tau)


def describe_tau(spactor_cfg, decided: Optional[int] = None) -> str:
    """tau for a log line: the fixed value, or auto's signal and bounds (and, once made, its decision)."""
    if spactor_cfg.tau != "auto":
        return f"{spactor_cfg.tau}"
    if decided is not None:
        return f"auto, decided {decided}"
    a = spactor_cfg.auto_tau
    return f"auto ({a.signal}, between steps {a.min_steps} and {a.max_steps})"


# "past the threshold": relative signals below threshold x their peak so far, absolute ones at or below it
RELATIVE_SIGNALS = {"rtd_gain": "rtd_info_gain", "sc_gap": "sc_replaced_gap"}  # signal -> validation metric
ABSOLUTE_SIGNALS = {"grad_cosine": "grad_cosine"}


@dataclass
class AutoTau:
    """The decision of ``spactor.tau: auto`` from ``spactor.auto_tau`` (an :class:`AutoTauConfig`)."""

    signal: str
    threshold: float
    patience: int
    min_steps: int
    max_steps: int
    interval: int
    history: list = field(default_factory=list)  # [(step, value)], every measurement so far
    peak: float = -math.inf
    streak: int = 0  # measurements past the threshold in a row
    decided: Optional[int] = None  # tau, once decided

    @classmethod
    def from_config(cls, auto_cfg, state: Optional[dict] = None) -> "AutoTau":
        """From the config, with ``state`` (:meth:`state`, as a checkpoint recorded it) restored."""
        auto = cls(auto_cfg.signal, auto_cfg.threshold, auto_cfg.patience, auto_cfg.min_steps, auto_cfg.max_steps,
                   auto_cfg.interval)
        if state:
            auto.history = [tuple(entry) for entry in state["history"]]
            peak = state["peak"]
            auto.peak = -math.inf if peak is None else peak
            auto.streak, auto.decided = state["streak"], state["decided"]
        return auto

    @property
    def tau(self) -> float:
        return float(self.decided if self.decided is not None else self.max_steps)

    @property
    def metric(self) -> str:
        """The measurement's name (a validation metric, or ``grad_cosine``)."""
        return {**RELATIVE_SIGNALS, **ABSOLUTE_SIGNALS}[self.signal]

    def measures_at(self, step: int) -> bool:
        """Whether the weights entering ``step`` are measured: every ``interval`` steps while undecided
        and hybrid."""
        return self.decided is None and 0 < step < self.max_steps and step % self.interval == 0

    def observe(self, step: int, value: float) -> bool:
        """Takes the measurement of the weights entering ``step``; True when it ends the hybrid
        phase there (tau = ``step``). A non-finite value counts as not past the threshold."""
        self.history.append((step, value))
        if math.isfinite(value):
            if self.signal in RELATIVE_SIGNALS:
                self.peak = max(self.peak, value)
                past = self.peak > 0 and value < self.threshold * self.peak
            else:
                past = value <= self.threshold
        else:
            past = False
        self.streak = self.streak + 1 if past else 0
        if self.streak >= self.patience and step >= self.min_steps:
            self.decided = step
        return self.decided == step

    def state(self) -> dict:
        """What a checkpoint records (JSON)."""
        return {"signal": self.signal, "history": [list(entry) for entry in self.history],
                "peak": self.peak if math.isfinite(self.peak) else None,
                "streak": self.streak, "decided": self.decided}
