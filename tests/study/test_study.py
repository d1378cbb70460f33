"""`spactor study --quick` end to end: every arm and seed, valid plots, a rerun trains nothing,
the FLOPs axis is the FLOPs model's, and a run repeated gives the same curve."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spactor_mega.study.plan import arm_runs, load_study, study_arms
from spactor_mega.study.report import nearest_fixed_tau
from spactor_mega.study.summary import read_records

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo_c4"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_study(tmp: Path) -> Path:
    """A tiny model on the demo corpus's validation file; the study's quick variant trains 8 steps."""
    base = {
        "model": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4, "num_encoder_layers": 4,
                  "num_decoder_layers": 2, "make_vocab_size_divisible_by": 8, "init": "t5"},
        "data": {"tokenizer": str(tmp / "tokenizer"), "tokenizer_vocab_size": 600,
                 "train_corpus": [str(DEMO / "c4-validation.*.json.gz")], "train_data": [str(tmp / "data" / "docs")],
                 "split": "95,5,0", "encoder_seq_length": 32, "preprocess_workers": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 40, "global_batch_size": 8, "micro_batch_size": 4, "save_interval": 0,
                  "eval_interval": 10, "eval_batches": 2},
        "logging": {"progress": False, "log_interval": 1000},
    }
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "base": str(tmp / "base.yaml"), "out_dir": str(tmp / "study"), "seeds": [1, 2, 3], "taus": [20, 30],
        "generators": [{"depth_fraction": 0.5}],
        "auto": [{"signal": "sc_gap", "threshold": 0.9, "patience": 1, "min_steps": 2, "max_steps": 40, "interval": 2}],
        "quick": {"taus": [4, 6], "overrides": {"train.steps": 8, "train.eval_interval": 2}},
    }
    (tmp / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp / "study.yaml"


def _spactor(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spactor_mega.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The quick study, preempted (SIGTERM) in step 3 of its first arm, then rerun to the end."""
    tmp = tmp_path_factory.mktemp("study")
    config = _write_study(tmp)
    command = ("study", "--config", str(config), "--quick", "--eval-data", str(tmp / "data" / "docs"))
    preempted = _spactor(*command, env={"SPACTOR_TEST_SIGNAL_AT_STEP": "3"})
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "[study] stopped in sc seed 1 (saved); rerun the same command to resume the study" in preempted.stderr
    assert not (tmp / "study" / "spactor-tau4").exists()  # nothing after the preempted arm started
    first = _spactor(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    return config, tmp / "study", first


def test_quick_study_runs_every_arm_and_seed_and_plots(quick_study):
    config, out, first = quick_study
    summary = json.loads((out / "summary.json").read_text())
    names = [arm["name"] for arm in summary["arms"]]
    assert names == ["sc", "spactor-tau4", "spactor-tau6", "spactor-inf", "spactor-auto-sc_gap",
                     "spactor-tau4-gen-depth_fraction0.5"]
    for arm in summary["arms"]:
        assert arm["seeds"] == [1, 2, 3]
        assert sorted(arm["runs"]) == ["1", "2", "3"]
        assert arm["curve"]["step"] == [0, 2, 4, 6, 8]
        assert all(math.isfinite(v) for v in arm["curve"]["sc_loss"])
        assert arm["final"]["sc_loss"]["n"] == 3
        assert arm["final"]["extra"]["docs"]["n"] == 3  # --eval-data: the extra set, evaluated by every run
    by_name = {arm["name"]: arm for arm in summary["arms"]}
    assert by_name["sc"]["signals"] is None  # SC only never runs the hybrid objective
    assert by_name["spactor-tau4"]["signals"]["step"] == 2  # the last eval point before tau
    assert by_name["spactor-inf"]["step_cost"]["flops_model"] > 1
    auto = by_name["spactor-auto-sc_gap"]  # tau chosen by each seed's run: its first SC-only step
    for seed, run in auto["runs"].items():
        assert auto["chosen_tau"][seed] == run["tau"] and 2 <= run["tau"] <= 8, auto["chosen_tau"]
    assert auto["final_vs_best_fixed"]["n"] == 3 and set(auto["best_fixed"].values()) <= {
        "spactor-tau4", "spactor-tau6", "spactor-inf"}
    for name in ("loss_vs_step.png", "loss_vs_flops.png", "loss_minus_sc_vs_step.png", "rtd_vs_prior.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert "| auto: " in table
    for seed in ("1", "2", "3"):  # the per-seed tau-auto table, from the summary's own numbers
        final, best = auto["runs"][seed]["sc_loss"][-1], auto["best_fixed"][seed]
        best_final = by_name[best]["runs"][seed]["sc_loss"][-1]
        assert (f"| {seed} | spactor-auto-sc_gap | {auto['chosen_tau'][seed]} | "
                f"{nearest_fixed_tau(auto['chosen_tau'][seed], summary)} | {best} | {final:.4f} | "
                f"{final - best_final:+.4f} |") in table
    assert nearest_fixed_tau(5, summary) == "spactor-tau4 / spactor-tau6"  # a tie names both
    assert nearest_fixed_tau(8, summary) == "spactor-inf" and nearest_fixed_tau(3, summary) == "spactor-tau4"
    assert "18 of 18 runs trained" in first.stderr


def test_rerun_trains_nothing(quick_study):
    config, out, _ = quick_study
    before = {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")}
    again = _spactor("study", "--config", str(config), "--quick")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 of 18 runs trained, 18 were finished" in again.stderr
    assert "[train]" not in again.stderr
    assert {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")} == before


def test_cumulative_flops_are_the_flops_model_per_sample_times_samples(quick_study):
    """Hybrid figure for the steps before tau, SC figure after, times the global batch."""
    from spactor_mega.data.dataset import SpactorBatchBuilder
    from spactor_mega.data.span_corruption import SpanCorruption
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
    from spactor_mega.model.t5 import model_vocab_size
    from spactor_mega.plan.flops import sample_flops

    config, out, _ = quick_study
    summary = json.loads((out / "summary.json").read_text())
    run = arm_runs(load_study(config, quick=True), ["spactor-tau6"], [2])[0]
    cfg = run.config
    tokenizer = T5SentencePieceTokenizer(cfg.data.tokenizer)
    corruption = SpanCorruption(cfg.data.encoder_seq_length, tokenizer.first_sentinel_id, tokenizer.num_sentinels,
                                cfg.spactor.noise_density, cfg.spactor.mean_noise_span_length)
    vocab = model_vocab_size(cfg.model, tokenizer.model_vocab_size, 1)
    mlm_positions = SpactorBatchBuilder(corruption, tokenizer.sp_size, cfg.spactor.mlm_fraction).mlm_capacity
    flops = sample_flops(cfg, corruption.encoder_length, corruption.decoder_length, vocab, mlm_positions)
    assert flops.hybrid > flops.sc_only
    curve = next(a for a in summary["arms"] if a["name"] == "spactor-tau6")["runs"]["2"]
    batch = cfg.train.global_batch_size
    for step, cumulative in zip(curve["step"], curve["flops"]):
        expected = batch * (min(step, 6) * flops.hybrid + max(step - 6, 0) * flops.sc_only)
        assert cumulative == pytest.approx(expected, rel=1e-9), step


def test_the_same_arm_and_seed_twice_give_the_same_curve(quick_study, tmp_path):
    """Run again in another folder: the same losses, step for step; also for the SC arm the quick
    study resumed after its preemption (so resuming inside a study is exact)."""
    config, out, _ = quick_study
    again = _spactor("study", "--config", str(config), "--quick", "--out-dir", str(tmp_path),
                     "--arms", "sc,spactor-tau4", "--seeds", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    for arm in ("sc", "spactor-tau4"):
        first = read_records(out / arm / "seed1" / "metrics.jsonl")
        second = read_records(tmp_path / arm / "seed1" / "metrics.jsonl")
        assert sorted(second["train"]) == sorted(first["train"]) == list(range(1, 9))
        for split in ("train", "valid"):
            for step, record in first[split].items():
                for key in ("loss", "sc_loss", "sc_accuracy", "rtd_loss", "mlm_loss"):
                    if key in record:
                        assert second[split][step][key] == record[key], (arm, split, step, key)


def test_study_configs_expand_to_valid_arms():
    """The shipped studies: SC, at least two taus, inf, a generator axis, three or more seeds; every
    arm validates as a train config."""
    from spactor_mega.plan.validate import validate

    for name in ("study-cpu.yaml", "study-gpu.yaml"):
        study = load_study(REPO / "configs" / name)
        taus = [arm.tau for arm in study_arms(study) if arm.tau != "auto"]
        assert taus[0] == 0 and math.inf in taus and len([t for t in taus if 0 < t < math.inf]) >= 2
        assert len(study.seeds) >= 3 and study.generators
        for run in arm_runs(study):
            validate(run.config, 1)


def test_a_study_is_one_wandb_group_of_runs_named_by_arm_and_seed():
    """Each (arm, seed) logs to W&B (when the base config names a project) in the study's group, under
    its own run name, tagged with its arm and seed."""
    study = load_study(REPO / "configs" / "study-cpu.yaml")
    runs = arm_runs(study)
    assert {run.config.logging.wandb_group for run in runs} == {"study-cpu"}
    assert len({run.config.logging.wandb_run_name for run in runs}) == len(runs) == 24
    for run in runs:
        assert run.config.logging.wandb_run_name == f"{run.arm.name}-seed{run.seed}"
        assert run.config.logging.wandb_tags == [run.arm.name, f"seed{run.seed}"]


def test_a_malformed_metrics_file_is_named_with_its_line(tmp_path):
    from spactor_mega.errors import UserError

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"split": "train", "step": 1, "loss": 5.0}\n{"split": "train", "st')  # cut off mid-write
    with pytest.raises(UserError) as refused:
        read_records(metrics)
    assert str(refused.value) == (f"{metrics}:2: not a metrics record (a JSON object with split and step); "
                                  "delete the arm's folder and rerun the study to retrain it")
