"""What a run reports: TensorBoard scalars, Weights & Biases, a JSON-lines record and a progress bar,
on the logging rank only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol

import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from spactor_mega.config import Config
from spactor_mega.errors import UserError
from spactor_mega.parallel import collectives
from spactor_mega.plan.derived import uses_wandb

WANDB_RUN_ID = "wandb_run_id"  # in train.save_dir, beside the checkpoints: the W&B run a resumed run continues


class ScalarSink(Protocol):
    """One destination of the logging rank's scalars, each named ``prefix/name`` (TensorBoard's tag)."""

    where: str  # what the run's last line says of it

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: str):
        # TensorBoard's writer loads tensorboard (about a second): only the logging rank does.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.where = f"TensorBoard logs {log_dir} (tensorboard --logdir {log_dir})"

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MetricsFileSink:
    """``logging.metrics_file``: appended to, so a resumed run adds its steps (a reader keeps the last
    record of a step)."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.records = open(path, "a", buffering=1)
        self.where = f"metrics {path}"

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        self.records.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")

    def close(self) -> None:
        self.records.close()


class WandbSink:
    """A Weights & Biases run (``logging.wandb_*``) holding the resolved config; W&B step = training
    step. Its id is kept in ``save_dir/wandb_run_id``: a run resumed from a checkpoint continues it;
    a run from step 0 starts a new one. Its files go to ``save_dir/wandb`` (or ``WANDB_DIR``)."""

    def __init__(self, cfg: Config, resumed: bool):
        # wandb is an optional extra (validation refused a W&B run without it); only the logging rank loads it
        import wandb

        lg, run_dir = cfg.logging, Path(cfg.train.save_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else None  # None: a new run
        try:
            self.run = wandb.init(
                project=lg.wandb_project, entity=lg.wandb_entity, name=lg.wandb_run_name, group=lg.wandb_group,
                tags=lg.wandb_tags or None, mode=lg.wandb_mode, id=run_id, resume="allow", config=cfg.to_dict(),
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                settings=wandb.Settings(silent=True),  # its banner and sync hints: the run's last line says where
            )
        except wandb.errors.Error as e:  # not logged in, an unknown entity, no network: one line, not a traceback
            raise UserError(f"logging.wandb_project={lg.wandb_project}: W&B did not start: {str(e).splitlines()[0]} "
                            "(or log offline: --logging.wandb_mode offline, then `wandb sync`)") from None
        run_id = self.run.id
        id_file.write_text(run_id + "\n")
        # W&B refuses steps below the last it holds: a run resumed from a checkpoint replays the steps
        # logged after it (the same values: resume is exact), which are not sent again
        self.first_step = self.run.starting_step
        self.where = (f"W&B run {run_id}, offline in {self.run.settings.sync_dir} (upload: wandb sync "
                      f"{self.run.settings.sync_dir})" if self.run.settings.mode == "offline" else
                      f"W&B run {self.run.url}")

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log({f"{prefix}/{name}": value for name, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def run_sinks(cfg: Config, resumed: bool) -> list[ScalarSink]:
    """The destinations ``cfg.logging`` asks for (call on the logging rank only)."""
    lg = cfg.logging
    sinks: list[ScalarSink] = []
    if lg.metrics_file:
        sinks.append(MetricsFileSink(lg.metrics_file))
    if lg.tensorboard_dir:
        sinks.append(TensorBoardSink(lg.tensorboard_dir))
    if uses_wandb(cfg):
        sinks.append(WandbSink(cfg, resumed))
    return sinks


class RunLogger:
    """The scalars into every sink of :func:`run_sinks` and a tqdm bar showing loss, stage and ETA;
    silent off rank 0."""

    def __init__(self, cfg: Config, total_steps: int, first_step: int, enabled: bool, resumed: bool):
        self.enabled = enabled
        self.sinks: list[ScalarSink] = run_sinks(cfg, resumed) if enabled else []
        self.bar = None
        if enabled and cfg.logging.progress:
            self.bar = tqdm(
                total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, disable=None,  # None: off when stderr is not a terminal
            )

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        for sink in self.sinks:
            sink.write(step, prefix, values)

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

    def destinations(self) -> str:
        return "; ".join(sink.where for sink in self.sinks)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()


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
