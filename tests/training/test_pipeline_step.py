"""Pipeline parallelism of D (packed encoder-decoder tensor through Megatron's 1F1B, and its
interleaved schedule with virtual stages), alone and with TP and DP, == TP=1 x PP=1: losses and (gathered, global-name) gradients of every stage, in
the hybrid and the SC-only stage. Each DP rank is checked against the reference for its own
micro-batches and sampling key (gradients before the DP all-reduce, which Megatron's DDP does).
G runs inside the schedule: on the rank holding it, micro-batch i's G forward comes right before
its D forward, and one backward per micro-batch reaches the shared embedding."""

import pytest
import torch

from spactor_mega.curriculum import Phase
from spactor_mega.parallel.testing import run_distributed

PHASES = {"hybrid": Phase.HYBRID, "sc": Phase.SC_ONLY}

def _cfg():
    from spactor_mega.model.synthetic import tiny_config

    return tiny_config(num_heads=4, num_encoder_layers=4, num_decoder_layers=2)


def _batches(n_micro):
    """This DP rank's micro-batches."""
    from megatron.core import parallel_state as ps

    from spactor_mega.model.synthetic import synthetic_batch

    dp = ps.get_data_parallel_rank()
    return [synthetic_batch(2, 16, 6, mlm_slots=4, sp_size=150, seed=10 + i + 100 * dp, pad_rows=1)
            for i in range(n_micro)]


def _objective():
    from spactor_mega.model.spactor import SpactorObjective

    return SpactorObjective(mask_id=250, sample_vocab_size=150, temperature=2.0, mlm_weight=1.0, rtd_weight=10.0)


def _grads(module, global_names=None):
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    if module is None:
        return {}
    full = gather_full_state_dict(module, grads=True, group=module.tp_group)  # G's is its own size-1 group
    rename = global_names or (lambda n: n)
    return {rename(k): v for k, v in full.items()}


def _generator_grads(g):
    """G's gradients summed over TP: each TP rank runs G's layers on its share of the rows only
    (what GeneratorDDP's reduction over TP x DP does in training)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grads = _grads(g)
    for v in grads.values():
        dist.all_reduce(v, group=ps.get_tensor_model_parallel_group())
    return grads


def _run(tp, pp, vp, split, reference, n_micro):
    """This pipeline's [{stage: {"metrics", "grads"}} per PP rank] (merged by the caller), and
    this rank's DP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from spactor_mega.model.stages import build_stage_chunks

    from spactor_mega.training.pipeline_step import pipeline_step
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    initialize_parallel(tp=tp, pp=pp, vp=vp, seed=11)
    # Megatron's GPU init path (on CPU redirected by cpu_compat), where its layers would draw under
    # the per-TP-rank RNG tracker; ours draw each full tensor from (seed, part, global layer, name)
    # and keep this rank's shard, so every stage and TP rank has exactly the TP=1 x PP=1 weights
    # (the reference is built on the CPU path).
    chunks, g, rtd = build_stage_chunks(_cfg(), 256, split, use_cpu_initialization=False)
    built = {f"d.{d.global_parameter_name(k)}": v for d in chunks for k, v in gather_full_state_dict(d).items()}
    for name, module in (("g", g), ("rtd", rtd)):
        if module is not None:
            built.update({f"{name}.{k}": v for k, v in gather_full_state_dict(module, group=module.tp_group).items()})
    for key, value in built.items():
        part, name = key.split(".", 1)
        assert torch.equal(value, reference[part][name]), f"TP={tp} PP={pp}: {key} differs from the PP=1 init"
    out = {}
    for stage in ("hybrid", "sc"):
        for m in (*chunks, g, rtd):
            if m is not None:
                m.zero_grad(set_to_none=True)
        events = _watch_stage0(chunks, g) if stage == "hybrid" else None
        metrics = pipeline_step(_objective(), _batches(n_micro), chunks, g, rtd, phase=PHASES[stage])
        if events is not None:  # G inside the schedule: micro-batch i's G, then its D, then the next
            assert "".join(events["order"]) == "GD" * n_micro, events["order"]
            # one backward per micro-batch reaches the shared embedding (D's and G's parts together)
            assert events["embedding_grads"] == n_micro, events["embedding_grads"]
        grads = {}
        for d in chunks:  # a bias table held by two chunks has the same (summed) grad in both
            grads.update({f"d.{k}": v for k, v in _grads(d, d.global_parameter_name).items()})
        if stage == "hybrid":
            grads.update({f"g.{k}": v for k, v in _generator_grads(g).items()} if g is not None else {})
            grads.update({f"rtd.{k}": v for k, v in _grads(rtd).items() if rtd is not None})
        out[stage] = {"metrics": metrics, "grads": grads}
    # every pipeline rank's grads, to the first TP/DP rank of the pipeline
    gathered = [None] * pp
    dist.all_gather_object(gathered, out, group=ps.get_pipeline_model_parallel_group())
    return {"dp": ps.get_data_parallel_rank(), "per_stage": gathered}


def _watch_stage0(chunks, g):
    """On the rank holding G: the order of G's forwards ("G") and D's first-layer forwards
    ("D"), and how often the shared embedding's gradient is accumulated."""
    if g is None:
        return None
    d = next(c for c in chunks if c.pre_process)
    events = {"order": [], "embedding_grads": 0}

    def count(_):
        events["embedding_grads"] += 1

    g.register_forward_pre_hook(lambda *_: events["order"].append("G"))
    d.encoder.layers[0].register_forward_pre_hook(lambda *_: events["order"].append("D"))
    d.embedding.weight.register_post_accumulate_grad_hook(count)
    return events


def _reference(n_micro):
    """PP=1 (and TP=1): weights, and the objective's per-micro-batch loss path as the truth
    (world rank r is DP rank r here: the truth for DP rank r of the other layouts)."""
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.training.pipeline_step import pipeline_step
    from spactor_mega.parallel.state import initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_full_state_dict

    initialize_parallel(tp=1, pp=1, seed=11)
    d, g, rtd = build_spactor_modules(_cfg(), 256)
    ref = {"d": gather_full_state_dict(d), "g": gather_full_state_dict(g, group=g.tp_group),
           "rtd": gather_full_state_dict(rtd)}
    objective = _objective()
    for stage in ("hybrid", "sc"):
        for m in (d, g, rtd):
            m.zero_grad(set_to_none=True)
        metrics = []
        for i, batch in enumerate(_batches(n_micro)):  # plain autograd, no schedule
            loss, m = objective(batch, d, g, rtd, phase=PHASES[stage])
            (loss / n_micro).backward()
            metrics.append(m)
        avg = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        grads = {f"d.{k}": v for k, v in _grads(d).items()}
        if stage == "hybrid":
            grads.update({f"g.{k}": v for k, v in _grads(g).items()})
            grads.update({f"rtd.{k}": v for k, v in _grads(rtd).items()})
        ref[stage] = {"metrics": avg, "grads": grads}
        # the PP=1 schedule path agrees too
        for m in (d, g, rtd):
            m.zero_grad(set_to_none=True)
        ref[stage]["schedule_metrics"] = pipeline_step(objective, _batches(n_micro), d, g, rtd, phase=PHASES[stage])
    return ref


def _worker(rank, world_size, layouts, n_micro):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from spactor_mega.parallel.state import destroy_parallel

    ref = _reference(n_micro)  # the truth for DP rank == this rank (batches and sampling key)
    weights = [None] * world_size
    dist.all_gather_object(weights, {k: ref[k] for k in ("d", "g", "rtd")})
    results = {}
    for name, (tp, pp, vp, split) in layouts.items():
        run = _run(tp, pp, vp, split, weights[0], n_micro)
        first_of_pipeline = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
        results[name] = run if first_of_pipeline else None
    destroy_parallel()
    return {"ref": ref if rank < 2 else None, "results": results}


def _merge(per_stage: list, stage: str) -> dict:
    merged = {}
    for out in per_stage:
        for k, v in out[stage]["grads"].items():
            if k in merged and "relative_attention_bias" not in k:
                raise AssertionError(f"{k} on two stages")
            if k in merged:
                assert torch.allclose(merged[k], v, atol=0, rtol=0), f"replicated {k} grads differ"
            merged[k] = v
    return merged


def _check(ref, per_stage):
    for stage in ("hybrid", "sc"):
        want = ref[stage]
        for out in per_stage:  # metrics broadcast to every pipeline rank
            got = out[stage]["metrics"]
            assert set(got) == set(want["metrics"]), stage
            for k, v in want["metrics"].items():
                assert abs(v - got[k]) <= 1e-5 * max(abs(v), 1e-3), (stage, k, v, got[k])
        grads = _merge(per_stage, stage)
        assert set(grads) == set(want["grads"]), (stage, set(grads) ^ set(want["grads"]))
        for k, v in want["grads"].items():
            scale = v.abs().max().clamp(min=1e-8)
            diff = (v - grads[k]).abs().max()
            assert diff <= 1e-5 * scale, f"{stage} {k}: max diff {diff:.3e} vs scale {scale:.3e}"


SPLIT_INSIDE_ENCODER = [((0, 3), (0, 0)), ((3, 4), (0, 2))]
STAGE_WITH_BOTH = [((0, 3), (0, 0)), ((3, 4), (0, 1)), ((4, 4), (1, 2))]
# PP=2 x V=2 in virtual order "E1|E3|D1|D1": rank 0 holds virtual stages 0 and 2 (the embedding and
# G with the first decoder layer), rank 1 stages 1 and 3; each rank has both bias tables.
VIRTUAL_2X2 = [((0, 1), (0, 0)), ((1, 4), (0, 0)), ((4, 4), (0, 1)), ((4, 4), (1, 2))]


@pytest.mark.parametrize(
    "world,n_micro,layouts",
    [
        # (TP, PP, V, split): PP=2 alone (and so DP=2), TP=2 x PP=2, TP=2 x DP=2, PP=2 x V=2 (x DP=2);
        # the interleaved schedule needs a multiple of PP micro-batches
        (4, 4, {"pp2": (1, 2, 1, SPLIT_INSIDE_ENCODER), "tp2pp2": (2, 2, 1, SPLIT_INSIDE_ENCODER),
                "tp2dp2": (2, 1, 1, None), "pp2vp2": (1, 2, 2, VIRTUAL_2X2)}),
        (3, 3, {"pp3": (1, 3, 1, STAGE_WITH_BOTH)}),
    ],
)
def test_pipeline_matches_pp1(world, n_micro, layouts):
    per_rank = run_distributed(_worker, world, layouts, n_micro, timeout=400)
    refs = [r["ref"] for r in per_rank[:2]]
    for ref in refs:
        for stage in ("hybrid", "sc"):  # PP=1 through the schedule == plain autograd
            for k, v in ref[stage]["metrics"].items():
                assert abs(v - ref[stage]["schedule_metrics"][k]) <= 1e-6 * max(abs(v), 1e-3), (stage, k)
        assert ref["hybrid"]["metrics"]["replaced_fraction"] > 0
    for name, (tp, pp, _, _) in layouts.items():
        runs = [r["results"][name] for r in per_rank if r["results"][name] is not None]
        assert sorted(run["dp"] for run in runs) == list(range(world // (tp * pp))), name
        for run in runs:
            _check(refs[run["dp"]], run["per_stage"])
