"""How the device computes in fp32, set once where a run starts (``training.loop.train``)."""

from __future__ import annotations

import torch


def set_float_numerics(cuda: bool, allow_tf32: bool) -> None:
    """On CUDA, fp32 matmuls and cuDNN convolutions use TF32 tensor cores when ``allow_tf32``
    (``train.allow_tf32``): torch leaves matmul TF32 off, so an fp32 run would reach about an eighth
    of the TF32 peak that ``plan/mfu.py`` measures it against. On CPUs, subnormals are flushed.

    The legacy ``allow_tf32`` flags, not the per-backend ``fp32_precision`` API: in torch 2.13 a
    later read of the legacy flags (inductor reads them) raises after the new API set them, while
    the legacy setters keep both APIs readable."""
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    else:
        # Subnormal floats take a slow path on x86 CPUs (squared gradients of tokens the model has
        # learned are improbable reach them). One A/B on the demo model: unflushed, its SC step grew from
        # 0.25 s to 0.64 s over 400 steps; flushed, 0.25-0.30 s, with bitwise the same loss at step 400
        # (docs/platform-notes.md).
        torch.set_flush_denormal(True)
