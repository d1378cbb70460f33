"""Megatron's distributed optimizer (``parallel.distributed_optimizer``), fp32 and bf16 on CPU.

One 2-process launch (DP = 2, 2 micro-batches per rank) trains, 8 steps across tau = 4: the plain
optimizer; the distributed one with overlapped gradient reduce-scatter and parameter all-gather in
small buckets (several per model); the same stopped at step 3 (before tau: the checkpoint holds G,
the RTD head and their optimizer); and both optimizers in bf16. The stopped run is then resumed at
DP = 1 (one process) and under TP = 2 (two processes, DP = 1), and bitwise at DP = 2. Each rank
writes its own ranges of the optimizer state (spactor_mega.checkpoint.distributed_optimizer); a
checkpoint in the format before (megatron-core's "fully_reshardable", written by commit 727a692:
tests/fixtures/checkpoint_distopt_727a692) loads at DP = 2, each rank's ranges equal to its tensors.

Reported losses are the global batch's (averaged over DP), so runs of any DP size compare directly.
"""

import math
from pathlib import Path

import pytest
import torch

from spactor_mega.checkpoint.distributed_optimizer import flat_range_pieces
from spactor_mega.parallel.testing import run_distributed
from tests.training.engine_runs import train_and_inspect
from tests.training.test_training import tiny_config

STEPS, TAU, STOP = 8, 4, 3
TOL = 1e-6  # relative; measured: 1e-8 between the optimizers, 5e-8 after a resume under another layout
BF16_REL = 2e-3  # as tests/training/test_bf16.py
DISTRIBUTED = dict(parallel__distributed_optimizer=True, parallel__overlap_grad_reduce=True,
                   parallel__overlap_param_gather=True, parallel__bucket_size=2000)
OLD_FORMAT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_distopt_727a692"


def _config(work: Path, name: str, **overrides):
    return tiny_config(work / name, **{"train__steps": STEPS, "spactor__tau": TAU, "train__micro_batch_size": 2,
                                       **overrides})


def _inspect(cfg, result, engine) -> dict:
    """The run's losses, final checkpoint and what D's optimizer holds; for a run that only
    loaded a checkpoint (no step), how what it loaded compares with the checkpoint's tensors."""
    parts = engine.d_optimizer.chained_optimizers
    stepped = [t for p in parts for g in p.optimizer.param_groups for t in g["params"]]
    return {"losses": [h["loss"] for h in result.history], "checkpoint": str(result.checkpoint),
            "sharded": all(hasattr(p, "shard_fp32_groups") for p in parts),
            "masters": sorted({str(t.dtype) for t in stepped}), "master_numel": sum(t.numel() for t in stepped),
            "model_numel": sum(t.numel() for c in engine.d_chunks for t in c.module.parameters()),
            **({} if result.history else _loaded_against_checkpoint(cfg, engine))}


def _loaded_against_checkpoint(cfg, engine) -> dict:
    """Each range of a parameter this DP rank's optimizer steps, against the same range of the
    checkpoint's whole tensors (read by global name, independently of the loader): the largest
    difference of the fp32 weights and moments, the elements compared, and the optimizer's step."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    path = str(OLD_FORMAT / f"iter_{STOP:07d}")
    wanted = {k: v for k, v in dist_checkpointing.load_tensors_metadata(path).items()
              if k.startswith("optimizer.state.") and ".discriminator." in k}
    saved = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
    tensors, _ = extract_sharded_tensors_and_factories(engine.d.module.sharded_state_dict(prefix="discriminator."))
    placed = {}  # id(parameter) -> (key, index of its stacked layer)
    for sharded in nested_values(tensors):
        first = next(iter(nested_values(sharded.build()))) if isinstance(sharded, ShardedTensorFactory) else sharded
        placed[id(sharded.data)] = (sharded.key, first.global_offset[:first.prepend_axis_num])
    worst, compared, steps = 0.0, 0, set()
    for part in engine.d_optimizer.chained_optimizers:
        for bucket in (b for buffer in part.gbuf_ranges for per_dtype in buffer.values() for b in per_dtype):
            for param, ranges in bucket["param_map"].items():
                key, layer = placed[id(param)]
                state = part._get_main_param_and_optimizer_states(param)
                steps.add(float(state["step"]))
                for name in ("param", "exp_avg", "exp_avg_sq"):
                    whole = saved[f"optimizer.state.{name}.{key}"][layer].reshape(-1)
                    want = whole[ranges["param"].start:ranges["param"].end]
                    worst = max(worst, (state[name].reshape(-1) - want).abs().max().item())
                    compared += want.numel()
    return {"loaded_difference": worst, "loaded_elements": compared, "loaded_steps": sorted(steps)}


def _train_and_inspect(rank, world_size, runs):
    return train_and_inspect(runs, _inspect)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("distopt")
    stop = dict(DISTRIBUTED, train__exit_interval=STOP)
    dp2 = run_distributed(_train_and_inspect, 2, [
        ("plain", _config(work, "plain")),
        ("distributed", _config(work, "distributed", **DISTRIBUTED)),
        ("stopped", _config(work, "stopped", **stop)),
        ("resumed_dp2", _config(work, "stopped", **DISTRIBUTED, train__resume="auto")),
        # loads the checkpoint and steps no further
        ("loaded_old_format", _config(work, "old_format", **DISTRIBUTED, train__steps=STOP,
                                      train__resume=str(OLD_FORMAT))),
        ("plain_bf16", _config(work, "plain_bf16", train__precision="bf16")),
        ("distributed_bf16", _config(work, "distributed_bf16", train__precision="bf16", **DISTRIBUTED)),
    ], timeout=900)[0]
    checkpoint = str(work / "stopped" / "ckpt" / f"iter_{STOP:07d}")  # the stopped run's, not the resumed one's
    resumed = dict(DISTRIBUTED, train__resume=checkpoint)
    dp1 = run_distributed(_train_and_inspect, 1, [
        ("resumed_dp1", _config(work, "dp1", **resumed))], timeout=600)[0]
    tp2 = run_distributed(_train_and_inspect, 2, [
        ("resumed_tp2", _config(work, "tp2", parallel__tensor_model_parallel_size=2, **resumed))], timeout=600)[0]
    return {**dp2, **dp1, **tp2}


def _close(have: list, want: list, rel: float) -> None:
    assert len(have) == len(want)
    for step, (a, b) in enumerate(zip(have, want), start=1):
        assert math.isfinite(a) and abs(a - b) <= rel * abs(b), (step, a, b)


def test_distributed_optimizer_gives_the_plain_optimizers_losses_and_weights(runs):
    from spactor_mega.checkpoint.megatron import read_weights

    plain, distributed = runs["plain"], runs["distributed"]
    assert distributed["sharded"] and not plain["sharded"]
    # each DP rank's optimizer steps its half of D (bucket padding aside), the plain one all of it
    assert plain["master_numel"] == plain["model_numel"]
    assert distributed["master_numel"] <= 0.55 * distributed["model_numel"]
    _close(distributed["losses"], plain["losses"], TOL)
    # what `spactor convert to-hf` reads: every module's full tensors from the checkpoint
    modules = ("discriminator",)
    want = read_weights(Path(plain["checkpoint"]), {}, modules)["discriminator"]
    have = read_weights(Path(distributed["checkpoint"]), {}, modules)["discriminator"]
    assert have.keys() == want.keys()
    for name in want:
        assert torch.allclose(have[name], want[name], rtol=0, atol=TOL * (1 + want[name].abs().max())), name


@pytest.mark.parametrize("name, rel", [("resumed_dp2", 0.0), ("resumed_dp1", TOL), ("resumed_tp2", TOL)])
def test_distributed_checkpoint_resumes_under_another_layout(runs, name, rel):
    uninterrupted = runs["distributed"]["losses"]
    stopped = runs["stopped"]["losses"]
    assert stopped == uninterrupted[:STOP]
    _close(stopped + runs[name]["losses"], uninterrupted, rel)


def test_distributed_optimizer_in_bf16_keeps_fp32_masters(runs):
    bf16 = runs["distributed_bf16"]
    assert bf16["sharded"] and bf16["masters"] == ["torch.float32"]
    _close(bf16["losses"], runs["plain"]["losses"], BF16_REL)
    _close(bf16["losses"], runs["plain_bf16"]["losses"], BF16_REL)
    assert bf16["losses"] != runs["distributed"]["losses"]  # it did train in bf16


def test_a_checkpoint_in_the_format_before_loads_exactly(runs):
    """Its state is whole tensors under the same keys: each DP rank reads exactly its own ranges."""
    loaded = runs["loaded_old_format"]
    assert loaded["loaded_difference"] == 0.0 and loaded["loaded_steps"] == [float(STOP)]
    assert loaded["loaded_elements"] == 3 * loaded["master_numel"]  # rank 0's ranges: about half of D


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_a_flat_range_is_cut_into_few_rectangular_pieces_in_order(shape):
    numbered = torch.arange(math.prod(shape)).view(shape)
    for start in range(numbered.numel() + 1):
        for end in range(start, numbered.numel() + 1):
            pieces = flat_range_pieces(shape, start, end)
            assert len(pieces) <= 2 * len(shape) - 1
            read = [numbered[tuple(slice(o, o + n) for o, n in zip(offset, size))].reshape(-1).tolist()
                    for offset, size in pieces]
            assert sum(read, []) == list(range(start, end)), (start, end)
