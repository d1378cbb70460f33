"""Signals of whether the hybrid objective still teaches D, derived from a hybrid-phase validation.

SpacTor's tau (the step where G and the RTD head leave) is chosen by grid search in the paper; the
run's own validation says when the hybrid objective stops helping. Reported beside the validation
metrics at every evaluation of a hybrid step (TensorBoard ``valid/...``, the metrics file, the
``[valid]`` line), from values the evaluation already has, so they cost nothing:

- ``rtd_prior_entropy``: H(p) in nats, p the validation's replaced fraction: the RTD loss of the best
  constant guess, what D's RTD head must beat to have learned anything;
- ``rtd_info_gain``: H(p) minus the validation RTD loss (nats), and ``rtd_info_gain_fraction`` (of
  H(p)): how much of the replaced-or-original question D's encoder answers;
- ``sc_replaced_gap``: D's span-corruption loss on G-replaced input minus on clean input: what the
  replacements still cost the decoder;
- G's MLM loss and accuracy are reported as they are (``mlm_loss``, ``mlm_accuracy``).
"""

from __future__ import annotations

import math


def binary_entropy(p: float) -> float:
    """H(p) = -p ln p - (1 - p) ln(1 - p) in nats (0 at p = 0 or 1)."""
    if not 0.0 < p < 1.0:
        return 0.0
    return -p * math.log(p) - (1.0 - p) * math.log1p(-p)


def hybrid_signals(evaluation: dict[str, float]) -> dict[str, float]:
    """The signals above from a hybrid-phase evaluation (keys ``rtd_loss``, ``replaced_fraction``,
    ``sc_loss`` and ``sc_loss_replaced``, as :func:`spactor_mega.training.loop.evaluate` reports
    them); ``{}`` for an SC-only one."""
    if not {"rtd_loss", "replaced_fraction", "sc_loss", "sc_loss_replaced"} <= evaluation.keys():
        return {}
    prior = binary_entropy(evaluation["replaced_fraction"])
    gain = prior - evaluation["rtd_loss"]
    return {
        "rtd_prior_entropy": prior,
        "rtd_info_gain": gain,
        "rtd_info_gain_fraction": gain / prior if prior > 0 else math.nan,
        "sc_replaced_gap": evaluation["sc_loss_replaced"] - evaluation["sc_loss"],
    }
