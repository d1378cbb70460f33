"""The peak table MFU is measured against."""

import pytest

from spactor_mega.plan.mfu import device_peak_tflops, mfu


@pytest.mark.parametrize("name, bf16, peak", [
    ("NVIDIA H200", True, 989.0), ("NVIDIA H100 80GB HBM3", True, 989.0), ("NVIDIA H100 PCIe", True, 756.0),
    ("NVIDIA H100 NVL", True, 835.0), ("NVIDIA H100 NVL", False, 417.5), ("NVIDIA GH200 480GB", True, 989.0),
    ("NVIDIA GH200 480GB", False, 494.0), ("NVIDIA H100 PCIe", False, 378.0),
    ("NVIDIA A100-SXM4-80GB", True, 312.0), ("NVIDIA A100-SXM4-80GB", False, 156.0), ("Tesla V100", True, None),
    (None, True, None),
])
def test_known_peaks(name, bf16, peak):
    assert device_peak_tflops(name, bf16) == peak


def test_override_wins_and_mfu_is_flops_over_peak():
    assert device_peak_tflops("NVIDIA H200", True, override=500.0) == 500.0
    assert mfu(2e15, seconds=2.0, world_size=4, peak_tflops=500.0) == pytest.approx(0.5)


def test_the_most_specific_fragment_is_listed_first():
    """A fragment found inside a later one's device names would shadow it (as "H100" did "H100 NVL")."""
    from spactor_mega.plan.mfu import PEAK_TFLOPS

    fragments = [fragment for fragment, _, _ in PEAK_TFLOPS]
    for i, earlier in enumerate(fragments):
        assert not any(earlier in later for later in fragments[i + 1:]), earlier
