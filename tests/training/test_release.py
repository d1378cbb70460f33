"""At tau the generator really leaves: after ``release_generator`` no G or RTD-head parameter,
gradient (buffer) or optimizer-state tensor is reachable, on every engine. The weak references
are taken here, from the outside, not from the engine's own bookkeeping."""

import json
from pathlib import Path

import pytest

from spactor_mega.parallel.testing import run_distributed

ENGINES = {"megatron": None, "zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
PRECISIONS = ("fp32", "bf16")


def _generator_tensors(engine) -> list:
    """G's and the RTD head's parameters, gradients, gradient buffers and optimizer state."""
    import torch

    from spactor_mega.training.engines.released import optimizer_state_tensors

    tensors = []
    if hasattr(engine, "aux"):  # DeepSpeed: one engine over G and the head
        modules = [engine.aux.module]
        optimizer = engine.aux.optimizer
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        optimizers = [optimizer]
    else:
        modules = [engine.g.module, engine.rtd.module]
        tensors += [b.grad_data for ddp in (engine.g, engine.rtd) for b in ddp.buffers]
        parts = getattr(engine.aux_optimizer, "chained_optimizers", [engine.aux_optimizer])
        optimizers = [part.optimizer for part in parts]
    for module in modules:
        for p in module.parameters():
            tensors += [p, p.grad, getattr(p, "main_grad", None), getattr(p, "ds_tensor", None)]
    tensors += optimizer_state_tensors(optimizers)
    tensors += [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    return [t for t in tensors if torch.is_tensor(t)]


def _release(rank, world_size, work: str):
    import itertools
    import weakref

    import torch

    from spactor_mega.curriculum import Phase
    from spactor_mega.model.spactor import SpactorObjective

    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine

    objective = SpactorObjective(mask_id=250, sample_vocab_size=150)

    out = {}
    for (name, zero), precision in itertools.product(ENGINES.items(), PRECISIONS):
        initialize_parallel(seed=3)
        cfg = tiny_config()
        cfg.train.global_batch_size = cfg.train.micro_batch_size = 2
        cfg.train.precision = precision
        if zero is not None:
            cfg.train.engine = "deepspeed"
            cfg.deepspeed.zero_stage = zero
            cfg.deepspeed.config = str(Path(work) / "torch_adam.json")
        bf16 = precision == "bf16"
        modules = build_spactor_modules(cfg, 256, params_dtype=torch.bfloat16 if bf16 else torch.float32)
        engine = build_engine(cfg, *modules, objective, bf16)
        del modules
        engine.train_step([synthetic_batch(2, 16, 6, mlm_slots=4, seed=1)], Phase.HYBRID)
        refs = [weakref.ref(t) for t in _generator_tensors(engine)]
        engine.release_generator()  # no gc.collect() here: the engine's own collection must suffice
        out[f"{name}-{precision}"] = {"tracked": len(refs), "alive": sum(r() is not None for r in refs),
                                      "counts": engine.parameter_counts()}
        del engine
        destroy_parallel(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    work = tmp_path_factory.mktemp("release")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    return run_distributed(_release, 1, str(work), timeout=600)[0]


@pytest.mark.parametrize("name", [f"{e}-{p}" for e in ENGINES for p in PRECISIONS])
def test_nothing_of_the_generator_is_alive_after_release(released, name):
    result = released[name]
    assert result["tracked"] > 10  # parameters, gradient buffers and optimizer state were found
    assert result["alive"] == 0
    counts = result["counts"]
    assert counts["generator"] == counts["rtd_head"] == counts["generator_optimizer_state"] == 0
    assert counts["discriminator"] > 0
