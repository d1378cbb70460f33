"""TP=2 on two gloo processes == TP=1: weights, every loss term, Gumbel samples and gradients,
in both stages (hybrid and SC-only)."""

import torch

from spactor_mega.parallel.testing import run_distributed


def _run_layout(tp: int) -> dict:
    from spactor_mega.model.spactor import SpactorObjective, build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    initialize_parallel(tp=tp, seed=11)
    d, g, rtd = build_spactor_modules(tiny_config(), 256)
    objective = SpactorObjective(mask_id=250, sample_vocab_size=150, temperature=2.0, mlm_weight=1.0, rtd_weight=10.0)
    batch = synthetic_batch(3, 24, 8, mlm_slots=6, sp_size=150, seed=5, pad_rows=1)
    res = {"weights": gather_full_state_dict(d), "g_weights": gather_full_state_dict(g, group=g.tp_group)}
    loss, metrics = objective(batch, d, g, rtd, stage="hybrid", step=7, micro_batch=2)
    loss.backward()
    res["hybrid"] = metrics
    res["samples"] = objective.last_samples.clone()
    res["grad_d"] = gather_full_state_dict(d, grads=True)
    res["grad_g"] = gather_full_state_dict(g, grads=True, group=g.tp_group)
    res["grad_rtd"] = gather_full_state_dict(rtd, grads=True, group=g.tp_group)
    for m in (d, g, rtd):
        m.zero_grad(set_to_none=True)
    loss, metrics = objective(batch, d, None, None, stage="sc")
    loss.backward()
    res["sc"] = metrics
    res["grad_d_sc"] = gather_full_state_dict(d, grads=True)
    return res


def _worker(rank, world_size):
    from spactor_mega.parallel.state import destroy_parallel

    out = {tp: _run_layout(tp) for tp in (1, 2)}  # same two processes: DP=2 x TP=1, then TP=2
    destroy_parallel()
    return out if rank == 0 else None  # rank 0 is DP rank 0 in both layouts (same sampling key)


def _assert_close_dicts(a: dict, b: dict, what: str, rtol=1e-5):
    assert set(a) == set(b), what
    for k in a:
        scale = a[k].abs().max().clamp(min=1e-8)
        diff = (a[k] - b[k]).abs().max()
        assert diff <= rtol * scale, f"{what}[{k}]: max diff {diff:.3e} vs scale {scale:.3e}"


def test_tp2_matches_tp1_in_both_stages():
    res = run_distributed(_worker, 2, timeout=240)[0]
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
    _assert_close_dicts(tp1["grad_d"], tp2["grad_d"], "hybrid D grads")
    _assert_close_dicts(tp1["grad_g"], tp2["grad_g"], "hybrid G grads")
    _assert_close_dicts(tp1["grad_rtd"], tp2["grad_rtd"], "hybrid RTD head grads")
    _assert_close_dicts(tp1["grad_d_sc"], tp2["grad_d_sc"], "SC-only D grads")
