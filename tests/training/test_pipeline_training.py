"""`spactor train` with pipeline parallelism, and checkpoints that do not depend on the layout:
saved under TP=2 x PP=2, resumed under TP=1 x PP=1, under PP=4 and under TP=2 x PP=2 x V=2
virtual stages (whose own checkpoint resumes under TP=1 x PP=1), the losses continue as in a
run that never stopped (fp32; 1e-5 relative, the reduction order differs across layouts). A TP=2 x PP=2
run through tau (G inside the schedule, then its stages re-planned in-process) has the PP=1 losses,
and under PP=2 x DP=2 with the distributed optimizer the weights of the plain optimizer (1e-6).
Adafactor re-plans at tau and resumes under another pipeline split too (its state saved per
parameter); under another TP size (its factored moments are per TP shard) it is refused with one
line, as is another model's checkpoint."""

import pytest
import torch

from spactor_mega.checkpoint.megatron import read_weights
from spactor_mega.checkpoint.store import find_checkpoint, read_record
from spactor_mega.parallel.testing import run_distributed
from tests.training.test_training import tiny_config

STOP = 3  # before tau = 4: the resumed runs reload G, the RTD head and their optimizer too
VIRTUAL_STOP = 5  # the virtual-stage run saves here (after tau: D's chunks and their optimizer)
REPLAN_SAVES = 3  # the PP = 2 run through tau saves before (step 3) and after (6) its re-plan
LOSSES = ("loss", "sc_loss", "rtd_loss", "mlm_loss")


def _train_all(rank, world_size, runs):
    """Runs ``train(cfg)`` for each config in turn in this process group (Megatron's groups are
    rebuilt for each layout); a CheckpointError is returned as its message."""
    from spactor_mega.checkpoint.store import CheckpointError
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    out = []
    try:
        for cfg in runs:
            try:
                out.append(train(cfg).history)
            except CheckpointError as e:
                out.append(str(e))
            destroy_parallel(destroy_process_group=False)
    finally:
        destroy_parallel()
    return out if rank == 0 else None


def _close(reference: list, got: list) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in reference[: len(got)]]
    for want, have in zip(reference, got):
        assert set(k for k in LOSSES if k in want) == set(k for k in LOSSES if k in have), want["step"]
        for key in LOSSES:
            if key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-5), (want["step"], key, want[key], have[key])


def test_checkpoint_resumes_under_other_layouts(tmp_path):
    work = tmp_path / "run"

    def cfg(name, tp=1, pp=1, **overrides):
        return tiny_config(work / name, parallel__tensor_model_parallel_size=tp,
                           parallel__pipeline_model_parallel_size=pp, **overrides)

    saved = work / "tp2pp2" / "ckpt" / f"iter_{STOP:07d}"
    adafactor_saved = work / "adafactor" / "ckpt" / f"iter_{1:07d}"
    virtual_saved = work / "tp2pp2vp2" / "ckpt" / f"iter_{VIRTUAL_STOP:07d}"
    four = run_distributed(_train_all, 4, [
        cfg("tp2pp2", 2, 2, train__exit_interval=STOP),
        cfg("pp4", 1, 4, train__resume=str(saved)),
        cfg("tp2pp2vp2", 2, 2, parallel__virtual_pipeline_model_parallel_size=2, train__resume=str(saved),
            train__exit_interval=VIRTUAL_STOP),
        cfg("adafactor", 2, 2, optim__optimizer="adafactor", train__exit_interval=1),
        cfg("replan", 2, 2, train__save_interval=REPLAN_SAVES),
        # PP = 2 x DP = 2: one backward per micro-batch reaches the shared embedding, which the
        # overlapped gradient reduce-scatter needs; the re-plan reshards the distributed optimizer
        cfg("replan_distributed", 1, 2, parallel__distributed_optimizer=True, parallel__overlap_grad_reduce=True,
            parallel__overlap_param_gather=True),
        # Adafactor re-plans at tau too (its state is saved per parameter), and resumes under another split
        cfg("adafactor_replan", 2, 2, optim__optimizer="adafactor"),
        cfg("adafactor_pp1", 2, 1, optim__optimizer="adafactor", train__resume=str(adafactor_saved)),
        # Adafactor's factored moments of a TP shard are not the full tensor's: compared at TP = 2
        cfg("adafactor_tp2", 2, 1, optim__optimizer="adafactor"),
        # replan_distributed's layout with the plain optimizer: its weights are the distributed one's,
        # the encoder's bias table held by both stages included (each DP rank steps its shard of it)
        cfg("replan_plain", 1, 2),
    ], timeout=600)[0]
    one = run_distributed(_train_all, 1, [
        cfg("reference"),
        cfg("tp1", train__resume=str(saved)),
        cfg("adafactor_tp1", optim__optimizer="adafactor", train__resume=str(adafactor_saved)),
        cfg("other_model", model__d_ff=128, train__resume=str(saved)),
        cfg("from_virtual", train__resume=str(virtual_saved)),
    ], timeout=600)[0]
    stopped, pp4, virtual, replan, reference = four[0], four[1], four[2], four[4], one[0]
    replan_distributed = four[5]
    assert [h["phase"] for h in reference] == [1.0] * 4 + [2.0] * 4
    assert len(stopped) == STOP
    _close(reference, stopped)  # TP=2 x PP=2 == TP=1 x PP=1 step by step
    for resumed in (pp4, one[1]):
        assert [h["step"] for h in resumed] == list(range(STOP + 1, 9))
        _close(reference[STOP:], resumed)
    assert [h["step"] for h in virtual] == list(range(STOP + 1, VIRTUAL_STOP + 1))
    _close(reference[STOP:], virtual)
    assert [h["step"] for h in one[4]] == list(range(VIRTUAL_STOP + 1, 9))
    _close(reference[VIRTUAL_STOP:], one[4])
    # TP = 2 x PP = 2 re-plans its stages at tau (the hybrid balance E2|E2D2 gave stage 0 room for G) and
    # keeps the losses of PP = 1 in both phases
    for run in (replan, replan_distributed):
        _close(reference, run)
        assert len(run) == 8
    layouts = [read_record(work / "replan" / "ckpt" / f"iter_{s:07d}")["pipeline_layout"] for s in (3, 6)]
    assert layouts == ["E2|E2D2", "E3|E1D2"], layouts
    assert "Adafactor's factored moments are kept per tensor-parallel shard" in one[2] and "TP=2" in one[2], one[2]
    adafactor_replan, adafactor_pp1, adafactor_tp2 = four[6], four[7], four[8]
    _close(adafactor_tp2, adafactor_replan)  # TP2 x PP2 re-planned at tau: Adafactor state moved between stages
    assert [h["step"] for h in adafactor_pp1] == list(range(2, 9))
    _close(adafactor_tp2[1:], adafactor_pp1)  # saved at TP2 x PP2 after step 1, resumed at TP2 x PP1
    assert "model.d_ff=64 but this run has model.d_ff=128" in one[3], one[3]
    distributed, plain = (read_weights(find_checkpoint("auto", work / name / "ckpt"), {}, ("discriminator",))
                          ["discriminator"] for name in ("replan_distributed", "replan_plain"))
    assert distributed.keys() == plain.keys()
    for name, want in plain.items():
        assert torch.allclose(distributed[name], want, rtol=0, atol=1e-6 * (1 + want.abs().max())), name
