"""Model FLOPs utilisation: the FLOPs model's training FLOPs per second per device over the
device's peak (dense, no sparsity) in the precision the run trains in.

Peaks are the vendors' dense figures: bf16 tensor cores for bf16 runs, TF32 for fp32 runs (what
an fp32 matmul uses on these GPUs with TF32 allowed). A device not in the table (a CPU, another
GPU) has no known peak: give ``train.peak_tflops``, or MFU is not reported.
"""

from __future__ import annotations

from typing import Optional

# (name fragment as torch.cuda.get_device_name() reports it, bf16 TFLOP/s, tf32 TFLOP/s), most
# specific first: "H100 PCIe" before "H100".
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),  # SXM
    ("A100", 312.0, 156.0),
)


def device_peak_tflops(device_name: Optional[str], bf16: bool, override: Optional[float] = None) -> Optional[float]:
    """``override`` (``train.peak_tflops``) if given, else the table's figure for ``device_name``."""
    if override:
        return override
    for fragment, bf16_peak, tf32_peak in PEAK_TFLOPS:
        if device_name and fragment in device_name:
            return bf16_peak if bf16 else tf32_peak
    return None


def mfu(model_flops_per_step: float, seconds: float, world_size: int, peak_tflops: float) -> float:
    """The fraction of ``world_size`` devices' peak that a step of ``model_flops_per_step`` used."""
    return model_flops_per_step / seconds / world_size / (peak_tflops * 1e12)
