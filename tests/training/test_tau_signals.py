"""The tau signals derived from a validation: their values, and nothing from an SC-only one."""

import math

import pytest

from spactor_mega.training.tau_signals import binary_entropy, hybrid_signals


def test_binary_entropy_is_the_constant_guess_loss():
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0
    p = 0.13  # the best constant logit log(p / (1 - p)) has BCE H(p)
    assert binary_entropy(p) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def test_signals_from_a_hybrid_evaluation_and_none_from_sc_only():
    hybrid = {"rtd_loss": 0.30, "replaced_fraction": 0.13, "sc_loss": 5.0, "sc_loss_replaced": 5.4, "mlm_loss": 6.1}
    s = hybrid_signals(hybrid)
    assert s["rtd_info_gain"] == pytest.approx(binary_entropy(0.13) - 0.30)
    assert s["rtd_info_gain_fraction"] == pytest.approx(s["rtd_info_gain"] / binary_entropy(0.13))
    assert s["sc_replaced_gap"] == pytest.approx(0.4)
    assert math.isnan(hybrid_signals({**hybrid, "replaced_fraction": 0.0})["rtd_info_gain_fraction"])
    assert hybrid_signals({"sc_loss": 5.0, "sc_accuracy": 0.2}) == {}
