"""No host read of a device tensor per micro-batch: each one is a GPU sync (the CPU waits for the
GPU's queue to drain), so a step of N micro-batches must read the device a fixed number of times.

On CPU every tensor is a host tensor, so the test counts every read the engine's step makes: a
``TorchFunctionMode`` sees each ``item``/``tolist``/``bool()``/``float()``/... of a tensor. The
micro-batches are made exactly as the training loop makes them (``loop.on_device``, outside the
count: what it reads are the input pipeline's CPU tensors), so every read counted is of a tensor
that lives on the GPU in a GPU run, in our code or the libraries'. The count of a step of 8
micro-batches must equal that of a step of 2, on both engines (Megatron's also as a PP=2 pipeline,
each stage counted), in the hybrid and the SC-only phase. On the code before this test it grew by
6 to 16 reads per micro-batch (the objective's metrics, the padding flag per stack, G's sample keys).
"""

import collections
import itertools
import json
import traceback
from pathlib import Path

import pytest

from spactor_mega.parallel.testing import run_distributed

# What turns a tensor's value into a Python object (all but numpy copy from the device and wait).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "numpy", "__array__",
              "__format__"}
MICRO_BATCHES = (2, 8)
ENGINES = {"megatron": None, "zero1": 1}


def _reads_mode():
    """A TorchFunctionMode counting host reads, by calling site (file:line outside torch)."""
    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.sites = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in HOST_READS:
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
                site = frames[-1]
                self.sites[f"{Path(site.filename).name}:{site.lineno}"] += 1
            return func(*args, **(kwargs or {}))

    return HostReads()


def _count(engine, phase, n: int, seed: int) -> dict:
    from spactor_mega.curriculum import Phase
    from spactor_mega.model.synthetic import synthetic_batch
    from spactor_mega.training.loop import on_device

    hybrid = phase is Phase.HYBRID
    # one micro-batch with encoder padding per step, so the masked attention path runs too
    batches = [on_device(synthetic_batch(2, 16, 6, mlm_slots=4, seed=seed + i, pad_rows=int(i == 0),
                                         with_mlm=hybrid)) for i in range(n)]
    mode = _reads_mode()
    with mode:
        engine.train_step(batches, phase)
    return dict(mode.sites)


def _host_reads(rank, world_size, work: str, engines: dict, pp: int):
    import torch

    from spactor_mega.curriculum import Phase
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import tiny_config
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.plan.layout import config_layout
    from spactor_mega.training.engines import build_engine

    objective = SpactorObjective(mask_id=250, sample_vocab_size=150)
    out = collections.defaultdict(dict)
    for (name, zero), n in itertools.product(engines.items(), MICRO_BATCHES):
        # DeepSpeed steps at its configured accumulation count: an engine per micro-batch count
        initialize_parallel(pp=pp, seed=3)
        cfg = tiny_config(tau=10)
        cfg.train.steps = 10  # tau == steps: the stages are not re-planned at the release
        cfg.parallel.pipeline_model_parallel_size = pp
        cfg.train.micro_batch_size = 2
        cfg.train.global_batch_size = 2 * n
        if zero is not None:
            cfg.train.engine = "deepspeed"
            cfg.deepspeed.zero_stage = zero
            cfg.deepspeed.config = str(Path(work) / "torch_adam.json")
        split = config_layout(cfg, 256, Phase.HYBRID).stage_split()
        modules = build_spactor_modules(cfg, 256, params_dtype=torch.float32, stage_split=split)
        engine = build_engine(cfg, *modules, objective, False)
        del modules
        for phase in (Phase.HYBRID, Phase.SC_ONLY):
            if phase is Phase.SC_ONLY:
                engine.release_generator()
            _count(engine, phase, n, seed=100)  # the first step sets up lazily (optimizer state)
            label = name if world_size == 1 else f"{name}_rank{rank}"
            out[f"{label}-{phase.name}"][n] = _count(engine, phase, n, seed=10 * n)
        del engine
        destroy_parallel(destroy_process_group=False)
    return dict(out)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    work = tmp_path_factory.mktemp("host_reads")
    (work / "torch_adam.json").write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    counts = run_distributed(_host_reads, 1, str(work), ENGINES, 1, timeout=600)[0]
    for per_rank in run_distributed(_host_reads, 2, str(work), {"megatron_pp2": None}, 2, timeout=600):
        counts.update(per_rank)
    return counts


CASES = [f"{e}-{p}" for e in [*ENGINES, "megatron_pp2_rank0", "megatron_pp2_rank1"] for p in ("HYBRID", "SC_ONLY")]


@pytest.mark.parametrize("case", CASES)
def test_host_reads_do_not_grow_with_micro_batches(counted, case):
    few, many = (counted[case][n] for n in MICRO_BATCHES)
    grown = {site: (few.get(site, 0), many[site]) for site in many if many[site] != few.get(site, 0)}
    total = {n: sum(counted[case][n].values()) for n in MICRO_BATCHES}
    print(f"{case}: host reads per step {total}")
    assert sum(many.values()) == sum(few.values()), f"reads per step {total}; sites (2 vs 8 micro-batches): {grown}"


def test_adafactor_step_stays_on_the_cpu_when_its_state_is_loaded():
    """A resume places each parameter's Adafactor state on the parameter's device, but its ``step``
    on the CPU, where torch keeps it (Adafactor reads it on the host every step). "meta" stands in
    for the GPU."""
    import torch

    from spactor_mega.training.engines.base import adafactor_state_on

    state = {"step": torch.tensor(3.0), "row_var": torch.ones(4, 1), "col_var": torch.ones(1, 2)}
    placed = adafactor_state_on(state, torch.device("meta"))
    assert placed["step"].device.type == "cpu" and placed["step"].item() == 3.0
    assert placed["row_var"].is_meta and placed["col_var"].is_meta
