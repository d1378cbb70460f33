"""tools/gpu_check.py, the one-command GPU check, run on the CPU at a tiny size (``--smoke``): every
part runs and reports, so the script a GPU session runs is not dead code."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("bench", "train", "attention", "sync", "vocab", "tf32", "memory")


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_every_part_runs_tiny_on_the_cpu(tmp_path):
    run = _gpu_check("--smoke", "--work", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout[run.stdout.index("gpu_check on cpu (smoke)"):].splitlines()[3:]
    assert [line.split()[:2] for line in summary] == [[part, "ok"] for part in PARTS], "\n".join(summary)
    # the training part stopped and resumed a run that crossed tau, saving asynchronously
    assert (tmp_path / "run" / "checkpoints" / "iter_0000006").is_dir()
    assert "stopped at 2 and resumed" in run.stdout
    assert "flash_attention_for_cpu" in run.stdout  # the profiler named the SDPA kernel


def test_without_a_gpu_it_checks_nothing_and_says_so():
    run = _gpu_check()
    assert run.returncode == 0 and "no CUDA GPU here; nothing checked" in run.stdout


def test_an_unknown_part_is_refused():
    run = _gpu_check("--smoke", "--parts", "bench,warp")
    assert run.returncode == 2 and "unknown parts ['warp']" in run.stderr
