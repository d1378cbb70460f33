"""TP=2 on two gloo processes == TP=1: weights, every loss term, Gumbel samples and gradients,
in both stages (hybrid and SC-only); G runs each row on one TP rank only (FLOPs per rank, RNG)."""

import pytest
import torch

from spactor_mega.curriculum import Phase

from spactor_mega.parallel.testing import run_distributed

G_FLOPS_BATCHES = (4, 3, 1)  # even split over TP=2, uneven, and a rank with no rows


def _generator_flops(objective, d, g, batch_size: int) -> int:
    """FLOPs torch counts in G's forward + backward (its MLM loss) on this rank."""
    from torch.utils.flop_counter import FlopCounterMode

    from spactor_mega.model.synthetic import synthetic_batch

    batch = synthetic_batch(batch_size, 24, 8, mlm_slots=6, sp_size=150, seed=9, pad_rows=1)
    with FlopCounterMode(display=False) as counter:
        objective.generator_pass(batch, d, g)["mlm_loss"].backward()
    return counter.get_total_flops()


def _run_layout(tp: int, init: str) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from spactor_mega.model.generator import GeneratorDDP
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    initialize_parallel(tp=tp, seed=11)
    d, g, rtd = build_spactor_modules(tiny_config(init=init), 256)
    # z-loss on (large enough to show in the gradients): its vocab-parallel log Z is checked too
    objective = SpactorObjective(mask_id=250, sample_vocab_size=150, temperature=2.0, mlm_weight=1.0, rtd_weight=10.0,
                                 z_loss=1e-2)
    batch = synthetic_batch(3, 24, 8, mlm_slots=6, sp_size=150, seed=5, pad_rows=1)  # 3 rows: uneven over TP=2
    res = {"weights": gather_full_state_dict(d), "g_weights": gather_full_state_dict(g, group=g.tp_group)}
    # G's gradients are the sum of its TP ranks' row gradients: reduced by the engine's DDP.
    g_ddp = GeneratorDDP(g, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    loss, metrics = objective(batch, d, g_ddp, rtd, phase=Phase.HYBRID)
    loss.backward()
    g_ddp.finish_grad_sync()
    res["hybrid"] = metrics
    res["samples"] = objective.last_samples.clone()
    res["grad_d"] = gather_full_state_dict(d, grads=True)  # includes G's part of the embedding's
    res["grad_g"] = gather_full_state_dict(g, grads=True, group=g.tp_group)
    res["grad_rtd"] = gather_full_state_dict(rtd, grads=True, group=g.tp_group)
    for m in (d, rtd):
        m.zero_grad(set_to_none=True)
    loss, metrics = objective(batch, d, None, None, phase=Phase.SC_ONLY)
    loss.backward()
    res["sc"] = metrics
    res["grad_d_sc"] = gather_full_state_dict(d, grads=True)
    res["g_flops"] = {b: _generator_flops(objective, d, g, b) for b in G_FLOPS_BATCHES}
    return res


def _default_rng_in_step_after_generator() -> bool:
    """With dropout, G on uneven rows (3 over TP=2) leaves the default generator (which drops
    TP-replicated activations) the same on both TP ranks."""
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config

    d, g, _ = build_spactor_modules(tiny_config(dropout=0.1), 256)
    batch = synthetic_batch(3, 24, 8, mlm_slots=6, sp_size=150, seed=5, pad_rows=1)
    SpactorObjective(mask_id=250, sample_vocab_size=150).generator_pass(batch, d, g)["mlm_loss"].backward()
    states = [None, None]
    torch.distributed.all_gather_object(states, torch.get_rng_state())
    return torch.equal(states[0], states[1])


def _worker(rank, world_size, init):
    from spactor_mega.parallel.state import destroy_parallel

    out = {tp: _run_layout(tp, init) for tp in (1, 2)}  # same two processes: DP=2 x TP=1, then TP=2
    rng_in_step = _default_rng_in_step_after_generator()  # still TP=2
    destroy_parallel()
    if rank == 0:  # rank 0 is DP rank 0 in both layouts (same sampling key)
        return {**out, "rng_in_step": rng_in_step}
    return {tp: {"g_flops": out[tp]["g_flops"]} for tp in out}


def _assert_close_dicts(a: dict, b: dict, what: str, rtol=1e-5):
    assert set(a) == set(b), what
    for k in a:
        scale = a[k].abs().max().clamp(min=1e-8)
        diff = (a[k] - b[k]).abs().max()
        assert diff <= rtol * scale, f"{what}[{k}]: max diff {diff:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("init", ["megatron", "t5"])  # T5's scales (and G's tied-head rescale) too
def test_tp2_matches_tp1_in_both_stages(init):
    results = run_distributed(_worker, 2, init, timeout=240)
    res = results[0]
    tp1, tp2 = res[1], res[2]
    for k in tp1["weights"]:  # CPU initialisation is TP-invariant: same starting point
        assert torch.equal(tp1["weights"][k], tp2["weights"][k]), k
    for k in tp1["g_weights"]:
        assert torch.equal(tp1["g_weights"][k], tp2["g_weights"][k]), k
    assert torch.equal(tp1["samples"], tp2["samples"])  # identical Gumbel samples
    for stage in ("hybrid", "sc"):
        assert set(tp1[stage]) == set(tp2[stage])
        for k, v in tp1[stage].items():
            assert abs(v - tp2[stage][k]) <= 1e-5 * max(abs(v), 1e-6), (stage, k, v, tp2[stage][k])
    assert tp1["hybrid"]["replaced_fraction"] > 0  # the RTD task is not trivial
    assert tp1["sc"]["z_loss"] > 0 and tp1["hybrid"]["z_loss"] > 0
    _assert_close_dicts(tp1["grad_d"], tp2["grad_d"], "hybrid D grads")
    _assert_close_dicts(tp1["grad_g"], tp2["grad_g"], "hybrid G grads")
    _assert_close_dicts(tp1["grad_rtd"], tp2["grad_rtd"], "hybrid RTD head grads")
    _assert_close_dicts(tp1["grad_d_sc"], tp2["grad_d_sc"], "SC-only D grads")

    # G repeats no work over TP: each rank's FLOPs are its share of the TP=1 total (both ranks
    # compute everything at TP=1 x DP=2). Even split: exactly half. Uneven: the layers' share is
    # whole rows (rows_r / b) and the vocab-parallel head's exactly 1/2, so a rank lies within
    # [floor(b/2), ceil(b/2)] / b of the total; the sum over ranks is exact.
    assert res["rng_in_step"]
    for b in G_FLOPS_BATCHES:
        total = tp1["g_flops"][b]
        assert results[1][1]["g_flops"][b] == total > 0
        per_rank = [results[r][2]["g_flops"][b] for r in (0, 1)]
        assert sum(per_rank) == total, (b, per_rank, total)
        for n in per_rank:
            assert (b // 2) * total <= n * b <= -(-b // 2) * total, (b, per_rank, total)
        if b % 2 == 0:
            assert per_rank == [total // 2, total // 2], (b, per_rank, total)
