#!/usr/bin/env python
"""GPU benchmark: SpacTor stage 1 (hybrid) and stage 2 (SC only) in bf16 on one GPU, T5-base and
T5-large shapes, against Hugging Face ``T5ForConditionalGeneration`` of the same shape and batch
(the named baseline: bf16 autocast over fp32 weights, torch AdamW, as a plain HF training script).

Prints tokens/s (encoder tokens), MFU (the FLOPs model's per-sample FLOPs, G counted in stage 1,
over the GPU's bf16 dense peak: ``spactor_mega.plan.mfu``) and peak GPU memory per row, beside the
dry run's prediction (model states of the parts alive + D's activations: ``spactor_mega.plan.memory``;
G's activations are not in it). Each row starts from an empty GPU (the previous row's model freed, the
caching allocator emptied, the peak reset), and stage 2 runs after G's release, as a run does at tau.
Our runs use the presets' own optimizer (Adafactor, T5's recipe) with Megatron's mixed-precision wrapper
(fp32 master weights and state). One command, a few minutes on one H100/H200:

    python tools/bench_gpu.py [--presets t5-base,t5-large] [--batch 16] [--steps 10]

Without a GPU it says so and exits 0 (``--smoke`` runs a tiny shape on the CPU, to check the script).
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from bench_train import VOCAB, SP_SIZE, batches, timed  # noqa: E402
from benchlib import table  # noqa: E402
from spactor_mega.config import Config, load_yaml  # noqa: E402
from spactor_mega.curriculum import Phase  # noqa: E402
from spactor_mega.model.spactor import SpactorObjective  # noqa: E402
from spactor_mega.model.stages import build_spactor_modules  # noqa: E402
from spactor_mega.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402
from spactor_mega.plan.dry_run import parameter_counts  # noqa: E402
from spactor_mega.plan.flops import sample_flops  # noqa: E402
from spactor_mega.plan.memory import GIB, activation_bytes, model_state_bytes  # noqa: E402
from spactor_mega.plan.mfu import device_peak_tflops  # noqa: E402
from spactor_mega.training.engines import build_engine  # noqa: E402
from spactor_mega.training.loop import on_device  # noqa: E402


def preset(name: str, batch: int, smoke: bool) -> Config:
    cfg = load_yaml(ROOT / "configs" / f"{name}.yaml")
    if smoke:  # the script's path on a CPU, not a measurement
        m = cfg.model
        m.d_model, m.d_kv, m.d_ff, m.num_heads, m.num_encoder_layers, m.num_decoder_layers = 64, 16, 128, 4, 2, 2
        cfg.data.encoder_seq_length = 64
    cfg.train.global_batch_size = cfg.train.micro_batch_size = batch
    cfg.train.precision = "bf16"
    cfg.spactor.tau = float("inf")
    return cfg


def _fresh_gpu() -> None:
    """Frees what the previous row left (Megatron's DDP hooks hold reference cycles, so its model
    outlives the function that built it until a collection) and resets the peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _synchronized(fn):
    def run(i: int) -> None:
        fn(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return run


def build_bench_engine(cfg: Config):
    """Our bf16 engine for ``cfg`` on one device (TP = PP = DP = 1), from a fresh GPU; the caller
    ends with ``destroy_parallel()``."""
    _fresh_gpu()
    initialize_parallel(1, 1, seed=1)
    d, g, rtd = build_spactor_modules(cfg, VOCAB, with_generator=True, params_dtype=torch.bfloat16)
    objective = SpactorObjective.from_config(cfg, mask_id=SP_SIZE + 100, sample_vocab_size=SP_SIZE)
    return build_engine(cfg, d, g, rtd, objective, True)  # it holds the modules: G's release frees G


def bench_ours(cfg: Config, steps: int) -> dict[str, tuple[float, float]]:
    """Median step seconds and peak GiB of our bf16 step, per phase."""
    engine = build_bench_engine(cfg)
    out = {}
    for phase, with_mlm in ((Phase.HYBRID, True), (Phase.SC_ONLY, False)):
        if phase is Phase.SC_ONLY:
            engine.release_generator()
            gc.collect()
        data = [on_device(b) for b in batches(cfg, steps + 1, with_mlm)[0]]
        _peak_memory_reset()
        seconds = timed(_synchronized(lambda i: engine.train_step([data[i]], phase)), steps)
        out[phase.name] = (seconds, _peak_memory_gib())
    del engine, data
    destroy_parallel()
    _fresh_gpu()
    return out


def bench_hf(cfg: Config, steps: int) -> tuple[float, float]:
    from spactor_mega.model.hf_mapping import build_hf_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _fresh_gpu()
    torch.manual_seed(1)
    model = build_hf_model(cfg.model, VOCAB).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [on_device(b) for b in batches(cfg, steps + 1, False)[0]]

    def step(i: int) -> None:
        b = data[i]
        labels = b["labels"].masked_fill(b["dec_loss_mask"] == 0, -100)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(),
                         decoder_input_ids=b["dec_input"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _peak_memory_reset()
    seconds = timed(_synchronized(step), steps)
    peak = _peak_memory_gib()
    del model, optimizer, data
    _fresh_gpu()
    return seconds, peak


def predicted_gib(cfg: Config, phase: Phase, decoder_length: int) -> float:
    """The dry run's memory for one GPU: the model states of the parts alive in ``phase`` (D, and
    in stage 1 G and the RTD head) and D's activations for one micro-batch."""
    counts = parameter_counts(cfg, VOCAB)
    params = counts["discriminator"] + (counts["generator"] + counts["rtd_head"] if phase is Phase.HYBRID else 0)
    states = sum(model_state_bytes(cfg, params, 1)["gpu"].values())
    activations = activation_bytes(cfg, cfg.data.encoder_seq_length, decoder_length, cfg.model.recompute)
    return (states + activations) / GIB


def bench_rows(presets: list[str], batch: int, steps: int, smoke: bool) -> tuple[list[list], float | None]:
    """One row per preset and step kind: shape, step, ms, tokens/s, TFLOP/s, MFU, peak GiB, the dry
    run's GiB; and the peak TFLOP/s MFU is measured against."""
    peak = device_peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None, True)
    rows = []
    for name in presets:
        cfg = preset(name, batch, smoke)
        s = cfg.data.encoder_seq_length
        _, sc, builder = batches(cfg, 1, False)
        flops = sample_flops(cfg, s, sc.decoder_length, VOCAB, builder.mlm_capacity)
        ours = bench_ours(cfg, steps)
        hf = bench_hf(cfg, steps)
        for label, (seconds, memory), per_sample, phase in (
            ("SpacTor stage 1 (hybrid)", ours["HYBRID"], flops.hybrid, Phase.HYBRID),
            ("SpacTor stage 2 (SC only)", ours["SC_ONLY"], flops.sc_only, Phase.SC_ONLY),
            ("HF T5 (baseline)", hf, flops.sc_only, None),
        ):
            tflops = per_sample * batch / seconds / 1e12
            predicted = f"{predicted_gib(cfg, phase, sc.decoder_length):.2f}" if phase else "-"
            rows.append([name, label, f"{seconds * 1e3:.0f}", f"{batch * s / seconds:,.0f}", f"{tflops:.1f}",
                         f"{100 * tflops / peak:.1f}%" if peak else "n/a", f"{memory:.2f}", predicted])
    return rows, peak


HEADER = ["shape", "step", "ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "dry-run GiB"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="t5-base,t5-large")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median), after one warm-up")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: checks the script only")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA GPU here; nothing measured (use --smoke to check the script on a CPU)")
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    rows, peak = bench_rows(args.presets.split(","), args.batch, args.steps, args.smoke)
    seq = preset(args.presets.split(",")[0], args.batch, args.smoke).data.encoder_seq_length
    table(f"bf16 training step on {device}, batch {args.batch} x {seq} (peak {peak or 'unknown'} TFLOP/s)",
          HEADER, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
