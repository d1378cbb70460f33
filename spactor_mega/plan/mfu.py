"""Model FLOPs utilisation: the FLOPs model's training FLOPs per second per device over the
device's peak (dense, no sparsity) in the precision the run trains in.

Peaks are the vendors' dense figures: bf16 tensor cores for bf16 runs, TF32 for fp32 runs (what
an fp32 matmul uses on these GPUs with TF32 allowed). A device not in the table (a CPU, another
GPU) has no known peak: give ``train.peak_tflops``, or MFU is not reported.
"""

from __future__ import annotations

from typing import Optional

# (name fragment as torch.cuda.get_device_name() reports it, bf16 TFLOP/s, tf32 TFLOP/s), dense: half
# the datasheets' "with sparsity" figures. The first fragment found in the name wins, so the more
# specific names come first ("GH200" before "H200", "H100 NVL" and "H100 PCIe" before "H100").
# Sources: NVIDIA's H100 datasheet (nvidia.com/en-us/data-center/h100: SXM bf16 1,979 / tf32 989,
# PCIe 1,513 / 756, NVL 1,671 / 835, all with sparsity); the H200 and GH200 datasheets
# (nvidia.com/en-us/data-center/h200, /grace-hopper-superchip: the H100 SXM figures); the A100
# datasheet (312 / 156 dense). torchtitan's and other trainers' peak tables use the same bf16 numbers.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0, 156.0),
)


def device_row(device_name: Optional[str], table: tuple[tuple, ...]) -> Optional[tuple]:
    """The first row of a per-GPU table (``(name fragment, figures...)``, the more specific names first)
    whose fragment is in ``device_name``, case aside; None when none is."""
    return next((row for row in table if device_name and row[0].lower() in device_name.lower()), None)


def device_peak_tflops(device_name: Optional[str], bf16: bool, override: Optional[float] = None) -> Optional[float]:
    """``override`` (``train.peak_tflops``) if given, else the table's figure for ``device_name``."""
    if override:
        return override
    row = device_row(device_name, PEAK_TFLOPS)
    return None if row is None else (row[1] if bf16 else row[2])


def mfu(model_flops_per_step: float, seconds: float, world_size: int, peak_tflops: float) -> float:
    """The fraction of ``world_size`` devices' peak that a step of ``model_flops_per_step`` used."""
    return model_flops_per_step / seconds / world_size / (peak_tflops * 1e12)
