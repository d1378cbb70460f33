"""The SpacTor curriculum: which phase a training step is in.

``Phase.HYBRID`` (steps < tau): MLM masking, generator G, RTD head and span corruption.
``Phase.SC_ONLY`` (steps >= tau): span corruption only; a step costs what plain T5 costs.
``tau = 0`` is plain T5, ``tau = inf`` the hybrid throughout. ("Stage" in this project means a
pipeline stage only.)
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    HYBRID = 1
    SC_ONLY = 2


def phase_at(step: int, tau: float) -> Phase:
    """Phase of the (0-based) optimizer step ``step``."""
    return Phase.HYBRID if step < tau else Phase.SC_ONLY
