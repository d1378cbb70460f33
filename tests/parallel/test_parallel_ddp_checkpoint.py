"""On CPU/gloo with the compatibility layer: Megatron DDP + get_megatron_optimizer (torch AdamW,
grad clipping) steps, Megatron's no-pipelining schedule, and dist_checkpointing save at TP=2 ->
load at TP=1 of D, G and the RTD head (with correct replica ids for our own modules)."""

import os

import pytest
import torch

from spactor_mega.curriculum import Phase

from spactor_mega.parallel.testing import DistributedWorkerError, run_distributed


def _sharded(d, g, rtd):
    sd = {}
    sd.update(d.sharded_state_dict(prefix="model."))
    sd.update(g.sharded_state_dict(prefix="generator."))
    sd.update(rtd.sharded_state_dict(prefix="rtd_head."))
    return sd


def _worker(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from spactor_mega.model.generator import GeneratorDDP
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.synthetic import synthetic_batch, tiny_config
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    out = {}
    initialize_parallel(tp=2, seed=3)
    cfg = tiny_config()
    d, g, rtd = build_spactor_modules(cfg, 256)
    ddp_cfg = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    dd, dr = (DistributedDataParallel(config=m.config, ddp_config=ddp_cfg, module=m) for m in (d, rtd))
    dg = GeneratorDDP(g, ddp_cfg)  # G's TP ranks hold different rows: reduced over TP x DP
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32)
    opt_d = get_megatron_optimizer(opt_cfg, [dd])
    opt_aux = get_megatron_optimizer(opt_cfg, [dg, dr])  # G + RTD head: dropped together at tau
    objective = SpactorObjective(mask_id=250, sample_vocab_size=150)
    batch = synthetic_batch(3, 24, 8, mlm_slots=6, sp_size=150, seed=5)
    w0 = gather_full_state_dict(d)
    losses = []
    for step in range(3):
        for m in (dd, dg, dr):
            m.zero_grad_buffer()
        opt_d.zero_grad()
        opt_aux.zero_grad()
        loss, metrics = objective(batch, dd, dg, dr, phase=Phase.HYBRID)  # wrapped modules
        loss.backward()
        for m in (dd, dg, dr):
            m.finish_grad_sync()
        ok_d, norm_d, _ = opt_d.step()
        ok_a, norm_a, _ = opt_aux.step()
        assert ok_d and ok_a and norm_d > 0 and norm_a > 0
        losses.append(metrics["loss"])
    out["hybrid_losses"] = losses

    # Megatron's schedule (PP=1): 2 micro-batches of the SC stage, grads finalised through DDP.
    d.config.finalize_model_grads_func = finalize_model_grads
    d.config.no_sync_func = dd.no_sync
    data = iter([synthetic_batch(3, 24, 8, sp_size=150, seed=s, with_mlm=False) for s in (10, 11)])

    def forward_step(data_iterator, model):
        loss, _ = objective(next(data_iterator), d, phase=Phase.SC_ONLY)
        return loss, lambda output: (output, {"loss": output.detach().clone()})

    dd.zero_grad_buffer()
    opt_d.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[dd],
        num_microbatches=2,
        seq_length=24,
        micro_batch_size=3,
        forward_only=False,
    )
    ok, norm, _ = opt_d.step()
    assert ok and norm > 0 and len(reduced) == 2
    out["trained_delta"] = max((v - w0[k]).abs().max().item() for k, v in gather_full_state_dict(d).items())

    full = {
        "d": gather_full_state_dict(d),
        "g": gather_full_state_dict(g, group=g.tp_group),
        "rtd": gather_full_state_dict(rtd, group=g.tp_group),
    }
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded(d, g, rtd), ckpt_dir)

    # Reload the TP=2 checkpoint into freshly initialised TP=1 modules (DP=2).
    initialize_parallel(tp=1, seed=99)
    d1, g1, r1 = build_spactor_modules(cfg, 256)
    loaded = dist_checkpointing.load(_sharded(d1, g1, r1), ckpt_dir)
    for prefix, module in (("model.", d1), ("generator.", g1), ("rtd_head.", r1)):
        part = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
        result = module.load_state_dict(part, strict=False)
        assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result.missing_keys
    diffs = {}
    for name, module in (("d", d1), ("g", g1), ("rtd", r1)):
        sd = module.state_dict()
        diffs[name] = max((sd[k] - v).abs().max().item() for k, v in full[name].items())
    out["reload_diffs"] = diffs
    destroy_parallel()
    return out


def test_ddp_optimizer_schedule_and_checkpoint_tp2_to_tp1(tmp_path):
    results = run_distributed(_worker, 2, str(tmp_path / "ckpt"), timeout=240)
    r0, r1 = results
    assert r0["hybrid_losses"] == r1["hybrid_losses"]
    assert r0["hybrid_losses"][-1] < r0["hybrid_losses"][0]  # AdamW steps on a fixed batch
    assert r0["trained_delta"] > 0
    for r in results:
        assert r["reload_diffs"] == {"d": 0.0, "g": 0.0, "rtd": 0.0}


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def test_run_distributed_reports_worker_errors():
    with pytest.raises(DistributedWorkerError, match="boom from rank 1"):
        run_distributed(_failing_worker, 2, timeout=60)
