"""What a run reports: TensorBoard scalars, a JSON-lines record and a progress bar, on the logging rank only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from spactor_mega.parallel import collectives


class RunLogger:
    """TensorBoard scalars, the metrics file (``logging.metrics_file``) and a tqdm bar showing loss,
    stage and ETA; silent off rank 0."""

    def __init__(self, tensorboard_dir: Optional[str], total_steps: int, first_step: int, enabled: bool, progress: bool,
                 metrics_file: Optional[str] = None):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.records = None
        if not enabled:
            return
        if metrics_file:
            # appended to: a resumed run adds its steps (a reader keeps the last record of a step)
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.records = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            # TensorBoard's writer loads tensorboard (about a second): only the logging rank does.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if progress:
            self.bar = tqdm(
                total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, disable=None,  # None: off when stderr is not a terminal
            )

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.records is not None:
            self.records.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")

    def advance(self, stage_name: str, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"stage={stage_name} loss={loss:.3f}", refresh=False)
            self.bar.update(1)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.records is not None:
            self.records.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def mean_over_data_parallel(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` averaged over the data-parallel group (one all-reduce), so a run reports the
    loss of the whole global batch whatever its DP size, as Megatron-LM does, not its rank's share.
    Collective over the DP group; every DP rank passes the same keys (they run the same phase)."""
    if not metrics or not torch.distributed.is_initialized() or ps.get_data_parallel_world_size() == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    return dict(zip(names, collectives.mean_over_ranks(values, ps.get_data_parallel_group()).tolist()))


def mean_of_micro_batches(outputs: list, names) -> torch.Tensor:
    """The per-micro-batch metric dicts (0-d tensors, or floats) averaged on their device: one
    float64 value per name of ``names``, in that order, without reading any of them."""
    return torch.stack([_stacked([o[k] for k in names]) for o in outputs]).mean(dim=0)


def _stacked(values: list) -> torch.Tensor:
    """Scalars (device tensors or floats) as one float64 1-D tensor on the tensors' device."""
    items = [v.detach().reshape(()).to(torch.float64) if isinstance(v, torch.Tensor)
             else torch.tensor(float(v), dtype=torch.float64) for v in values]
    device = next((v.device for v in items if v.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([v.to(device) for v in items])


def average_metrics(outputs: list) -> dict[str, float]:
    """The per-micro-batch metric dicts a schedule returns, averaged on their device and read on the
    host once (a GPU sync: one per step, whatever the number of micro-batches)."""
    if not outputs:
        return {}
    names = list(outputs[0])
    return dict(zip(names, mean_of_micro_batches(outputs, names).tolist()))


def metrics_reducer(metrics: dict):
    """The loss function a Megatron ``forward_step_func`` returns beside its loss: it hands the
    schedule the step's metrics (the schedule divides the loss by the micro-batch count in place and
    collects what this returns per micro-batch, for :func:`average_metrics`), unread."""

    def reduce(output_tensor):
        return output_tensor, metrics

    return reduce
