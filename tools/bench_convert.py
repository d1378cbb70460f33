#!/usr/bin/env python
"""Conversion benchmark: ``spactor convert`` time and peak memory for a T5-base-shaped model.

Writes a random T5-base-shaped SpacTor checkpoint (d_model 768, 12 + 12 layers, d_ff 2048, 12
heads, vocab 32128; D, G, the RTD head and their AdamW state after one step, as training saves
them), then runs each conversion in a fresh process and reports its wall time and peak resident
memory above what the process holds once torch, Megatron-Core and transformers are imported. The named
baseline is one copy of D's fp32 weights: an exporter that holds the checkpoint's weights and
the HF model at once needs about two, one that also builds a model to load into, three.

Usage: python tools/bench_convert.py [--work DIR] [--layers 12] [--d-model 768] [--d-ff 2048] [--vocab 32128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import table  # noqa: E402

DEMO = ROOT / "data" / "demo_c4"

# Runs in a fresh process: imports first, then the RSS baseline, then one conversion.
_MEASURE = r"""
import json, sys, time
import torch, transformers, megatron.core, safetensors  # noqa: F401  (what any conversion imports)
from spactor_mega.convert import hf_export, hf_import  # noqa: F401
from spactor_mega.parallel.state import single_process_parallel

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

with single_process_parallel():  # process group and Megatron import costs before the baseline
    pass
base = status("VmRSS:")
kind, src, dst, dtype = sys.argv[1:5]
start = time.perf_counter()
if kind == "to-hf":
    hf_export.export_to_hf(src, dst, dtype=dtype, force=True)
else:
    hf_import.import_from_hf(src, dst, tp=1, force=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_above_base": status("VmHWM:") - base}))
"""


def _write_checkpoint(work: Path, d_model: int, d_ff: int, layers: int, vocab: int) -> tuple[Path, int]:
    """A random T5-base-shaped SpacTor checkpoint as training writes it; returns (dir, D's fp32 bytes)."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import torch
from spactor_mega.checkpoint.megatron import save_checkpoint
from spactor_mega.checkpoint.store import make_record
from spactor_mega.config import Config
from spactor_mega.data.tokenizer import T5SentencePieceTokenizer, train_sentencepiece
from spactor_mega.model.stages import build_spactor_modules
from spactor_mega.model.synthetic import synthetic_batch
from spactor_mega.model.t5 import model_vocab_size
from spactor_mega.parallel.state import single_process_parallel
from spactor_mega.curriculum import Phase
from spactor_mega.model.spactor import SpactorObjective
from spactor_mega.training.engines import build_engine
import gzip, json

work = Path({str(work)!r})
texts = [json.loads(l)["text"] for f in sorted(Path({str(DEMO)!r}).glob("c4-validation.*.json.gz"))
         for l in gzip.open(f, "rt", encoding="utf-8")]
spm = train_sentencepiece(iter(texts), work / "tok" / "spiece", vocab_size=1000)
tok = T5SentencePieceTokenizer(spm)
cfg = Config()
m = cfg.model
m.d_model, m.d_kv, m.d_ff, m.num_heads = {d_model}, 64, {d_ff}, {d_model} // 64
m.num_encoder_layers = m.num_decoder_layers = {layers}
m.vocab_size = {vocab}
cfg.spactor.tau = 1000.0
with single_process_parallel():
    vocab = model_vocab_size(m, tok.model_vocab_size, 1)
    d, g, rtd = build_spactor_modules(cfg, vocab)
    print(sum(p.numel() for p in d.parameters()) * 4)
    objective = SpactorObjective.from_config(cfg, mask_id=tok.mask_id, sample_vocab_size=tok.sp_size)
    engine = build_engine(cfg, d, g, rtd, objective, False)
    engine.train_step([synthetic_batch(1, 16, 4, 2, sp_size=tok.sp_size)], Phase.HYBRID)  # AdamW state
    save_checkpoint(work / "ckpt", 100, engine.sharded_state_dict(), make_record(cfg, 100, vocab), tok.model_file)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return work / "ckpt" / "iter_0000100", int(out.stdout.strip().splitlines()[-1])


def _measure(kind: str, src: Path, dst: Path, dtype: str = "fp32") -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(src), str(dst), dtype], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt, weights = _write_checkpoint(work, args.d_model, args.d_ff, args.layers, args.vocab)
        print(f"checkpoint: {_size(ckpt) / 1e9:.2f} GB on disk (D, G, RTD head, AdamW state) written in "
              f"{time.perf_counter() - t0:.0f} s; D = {weights / 4 / 1e6:.0f}M parameters")
        rows = [["baseline: one copy of D's fp32 weights", "-", f"{weights / 1e9:.2f}", "1.00x", "-"]]
        runs = [("to-hf", ckpt, work / "hf32", "fp32"), ("to-hf", ckpt, work / "hf16", "bf16"),
                ("from-hf", work / "hf32", work / "imported", "fp32")]
        for kind, src, dst, dtype in runs:
            r = _measure(kind, src, dst, dtype)
            rows.append([f"spactor convert {kind}" + (f" --dtype {dtype}" if kind == "to-hf" else " --tp 1"),
                         f"{r['seconds']:.1f}", f"{r['peak_above_base'] / 1e9:.2f}",
                         f"{r['peak_above_base'] / weights:.2f}x", f"{_size(dst) / 1e9:.2f} GB"])
        table(f"Conversion of a T5-base-shaped model (d_model {args.d_model}, {args.layers}+{args.layers} layers, "
              f"vocab {args.vocab}); peak RSS above the imports of a fresh process",
              ["conversion", "time s", "peak GB", "vs one copy", "output"], rows)


if __name__ == "__main__":
    main()
