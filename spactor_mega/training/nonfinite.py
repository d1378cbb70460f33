"""Non-finite steps: a step whose loss or gradient norm is not finite changes nothing.

The engines decide it (:func:`any_rank_nonfinite`, agreed over every rank, since a pipeline's
loss exists on its last stage only and a NaN can start on one data-parallel rank) before any
optimizer applies an update, and report ``skipped`` 1.0 for it; such a step also leaves the LR
schedules where they were (as Megatron-LM does for its fp16 overflow skips), so the schedule
counts applied updates. :class:`SkippedSteps` counts them in the loop (the counts travel in the
checkpoint's run.json) and stops the run after ``train.max_skipped_steps`` in a row.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from spactor_mega.errors import UserError
from spactor_mega.parallel import collectives

# Test-only fault injection: comma-separated step numbers (1-based) whose loss is made NaN.
TEST_NAN_STEPS_ENV = "SPACTOR_TEST_NAN_AT_STEP"
# Test-only: comma-separated step numbers (1-based) whose gradients in one part (G's engine) are made NaN.
TEST_NAN_GRAD_STEPS_ENV = "SPACTOR_TEST_NAN_GRAD_AT_STEP"


class NonFiniteStepsError(UserError):
    """Non-finite steps stopped the run (the CLI prints it as one line)."""

    same_on_every_rank = True


def any_rank_nonfinite(values: Iterable[float]) -> bool:
    """True on every rank when any of ``values`` is not finite on any rank (collective over the world)."""
    return collectives.any_rank(any(not math.isfinite(float(v)) for v in values))


def inject_test_nan(step: int, micro_batches: list[dict], data_parallel_rank: int) -> None:
    """Test-only: when ``step`` is listed in ``$SPACTOR_TEST_NAN_AT_STEP``, data-parallel rank 0
    gets NaN span-corruption loss weights, so its loss and every gradient that loss reaches are NaN,
    as a bad batch's would be (the other ranks see it only through the gradient reduction)."""
    listed = os.environ.get(TEST_NAN_STEPS_ENV, "")
    if data_parallel_rank != 0 or str(step) not in listed.split(","):
        return
    for batch in micro_batches:
        batch["dec_loss_mask"] = batch["dec_loss_mask"] * float("nan")


def inject_test_nan_gradients(module: torch.nn.Module, next_step: Callable[[], int]) -> None:
    """Test-only: on global rank 0, the gradients reaching ``module``'s parameters in a step that
    ``$SPACTOR_TEST_NAN_GRAD_AT_STEP`` lists (``next_step()``: the step being run) are made NaN while
    the loss stays finite, as an overflow in one part's backward would make them."""
    listed = os.environ.get(TEST_NAN_GRAD_STEPS_ENV, "")
    if not listed or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    steps = {int(s) for s in listed.split(",")}
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(lambda grad: grad * float("nan") if next_step() in steps else grad)


class SkippedSteps:
    """Counts skipped steps (``total``, for the logs) and how many of them came in a row; a resumed
    run continues the counts its checkpoint recorded."""

    def __init__(self, limit: int, total: int = 0, in_a_row: int = 0):
        self.limit = limit
        self.total = total
        self.in_a_row = in_a_row

    def count(self, skipped: bool) -> None:
        self.total += int(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    @property
    def exceeded(self) -> bool:
        """``train.max_skipped_steps`` steps in a row were skipped: the run stops."""
        return self.in_a_row >= self.limit

    def error(self, step: int, last_checkpoint: Optional[Path]) -> NonFiniteStepsError:
        where = (f"resume from the last good checkpoint {last_checkpoint}" if last_checkpoint
                 else "no checkpoint was written before it")
        return NonFiniteStepsError(
            f"stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
            f"and were skipped (train.max_skipped_steps={self.limit}); {where}, with a lower optim.lr or "
            "other data")
