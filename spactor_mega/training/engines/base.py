"""The contract between the training loop and an engine.

An engine owns this rank's modules (D's stage; G and the RTD head until tau), their gradient
reduction, optimizers, LR schedules and checkpoints, and runs the :class:`SpactorObjective` it is
given on each micro-batch. The loop only calls what :class:`Engine` lists; engines are found by
``train.engine`` in :data:`spactor_mega.plan.engines.ENGINES`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

import torch

from spactor_mega.config import Config
from spactor_mega.curriculum import Phase


class Engine(Protocol):
    """Built as ``Engine(cfg, discriminator, generator, rtd_head, objective, bf16)``."""

    has_generator: bool  # G and the RTD head are still held (on some pipeline stage)

    def train_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; their averaged metrics, plus
        ``grad_norm``, ``lr`` (and ``generator_grad_norm`` in the hybrid phase) and ``skipped``
        (1.0, the same on every rank, when a non-finite loss or gradient norm left everything
        unchanged: :mod:`spactor_mega.training.nonfinite`)."""

    def eval_step(self, micro_batches: list[dict], phase: Phase) -> dict[str, float]:
        """The objective's averaged metrics on ``micro_batches``, no gradients, nothing changed."""

    def gradient_cosine(self, micro_batch: dict) -> float:
        """The cosine between the gradients of D's SC loss and of the auxiliary (RTD + MLM) loss on
        D's embedding and encoder, for ``micro_batch`` (the same micro-batch on every rank; it
        carries the MLM fields): :mod:`spactor_mega.training.grad_agreement`. Collective; the same
        value on every rank; NaN where the engine cannot measure it. Hybrid phase only (G held);
        leaves gradients, optimizers and RNG states as they were."""

    def release_generator(self) -> None:
        """Drops G, the RTD head, their gradients and optimizer state (tau reached)."""

    def save(self, save_dir: str | Path, step: int, record: dict, tokenizer_file: Optional[Path]) -> Path:
        """Writes ``save_dir/iter_NNNNNNN`` (collective) through :mod:`spactor_mega.checkpoint.store`,
        or starts writing it (``train.async_save``; :meth:`complete_saves` publishes it)."""

    def complete_saves(self, wait: bool) -> None:
        """Publishes the saves whose files every rank has written (``latest`` then names the newest);
        with ``wait``, first waits for all saves started (collective; a no-op for synchronous saves)."""

    def load(self, path: Path) -> None:
        """Restores modules, optimizers and schedules from a checkpoint this engine wrote."""

    def parameter_counts(self) -> dict[str, int]:
        """Elements per part on this rank: ``discriminator``, ``generator``, ``rtd_head``,
        ``generator_optimizer_state`` (after the release: what of them is still alive)."""


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The modules in eval mode (no dropout) for the block, back in train mode after it."""
    modules = list(modules)
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module in modules:
            module.train()


def torch_adafactor(cfg: Config, params: list) -> torch.optim.Optimizer:
    """torch's Adafactor over one group of ``params`` (weight decay on every tensor), as both engines
    use it (neither megatron-core nor DeepSpeed builds Adafactor)."""
    return torch.optim.Adafactor(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def adafactor_state_on(state: dict, device: torch.device) -> dict:
    """One parameter's torch Adafactor state (as a checkpoint holds it) placed as torch's own
    ``load_state_dict`` places it: the moments on the parameter's ``device``, ``step`` on the CPU.
    Adafactor reads ``step`` on the host (``.item()``, three times per parameter per step in its
    foreach path): a GPU ``step`` would make each of those a device sync."""
    return {k: v.to("cpu" if k == "step" else device) if torch.is_tensor(v) else v for k, v in state.items()}
