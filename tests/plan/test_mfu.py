"""The peak table MFU is measured against."""

import pytest

from spactor_mega.plan.mfu import device_peak_tflops, mfu


@pytest.mark.parametrize("name, bf16, peak", [
    ("NVIDIA H200", True, 989.0), ("NVIDIA H100 80GB HBM3", True, 989.0), ("NVIDIA H100 PCIe", True, 756.0),
    ("NVIDIA A100-SXM4-80GB", True, 312.0), ("NVIDIA A100-SXM4-80GB", False, 156.0), ("Tesla V100", True, None),
    (None, True, None),
])
def test_known_peaks(name, bf16, peak):
    assert device_peak_tflops(name, bf16) == peak


def test_override_wins_and_mfu_is_flops_over_peak():
    assert device_peak_tflops("NVIDIA H200", True, override=500.0) == 500.0
    assert mfu(2e15, seconds=2.0, world_size=4, peak_tflops=500.0) == pytest.approx(0.5)
