"""``spactor study``: does the curriculum pay? SC only vs SpacTor(tau) vs SpacTor(inf), seeds, plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spactor_mega.plan.validate import validate
from spactor_mega.study.plan import arm_runs, load_study
from spactor_mega.study.report import markdown_table, plot_study
from spactor_mega.study.runner import run_arms
from spactor_mega.study.summary import summarize, write_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a SpacTor study from one base train config: span corruption only (tau 0), SpacTor(tau) at the "
        "study's taus, SpacTor(inf) and the generator-size arms, each with every seed, the same steps and data "
        "order. Each arm is an ordinary train run in OUT_DIR/ARM/seedS (config.yaml, checkpoints, metrics.jsonl); "
        "a rerun resumes unfinished arms and skips finished ones. Writes OUT_DIR/summary.json, summary.md and "
        "PNG plots; TensorBoard: tensorboard --logdir OUT_DIR/tensorboard."
    )
    parser.epilog = ("examples:\n  spactor study --config configs/study-cpu.yaml\n"
                     "  spactor study --config configs/study-cpu.yaml --quick --out-dir /tmp/study\n"
                     "  spactor study --config configs/study-gpu.yaml --arms sc,spactor-inf --seeds 1")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="study YAML (see configs/study-*.yaml)")
    parser.add_argument("--quick", action="store_true", help="the study's `quick` variant: a few steps of each arm")
    parser.add_argument("--out-dir", help="where the arms and the report go (default: the study's out_dir)")
    parser.add_argument("--eval-data", nargs="+", default=[], metavar="PREFIX",
                        help="extra indexed datasets (prefixes of .bin/.idx) every arm evaluates on, beside its "
                             "validation split")
    parser.add_argument("--arms", help="comma-separated arm names: run only these (e.g. to spread arms over nodes)")
    parser.add_argument("--seeds", help="comma-separated seeds: run only these")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="ranks per arm: > 1 launches each arm with torchrun on this node (default 1: in this "
                             "process)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: summarize the finished arms")


def run(args: argparse.Namespace) -> int:
    study = load_study(args.config, quick=args.quick)
    if args.out_dir:
        study.out_dir = args.out_dir
    study.eval_data = [*study.eval_data, *args.eval_data]
    arms = args.arms.split(",") if args.arms else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    runs = arm_runs(study, arms, seeds)
    for run in runs:  # every arm's config is checked before any arm trains
        validate(run.config, args.nproc_per_node)
    if not args.report_only:
        trained, stopped = run_arms(runs, args.nproc_per_node)
        if stopped is not None:  # preempted, as `spactor train` is: saved, exit 0, resumable
            print(f"[study] stopped in {stopped.arm.name} seed {stopped.seed} (saved); rerun the same command to "
                  "resume the study", file=sys.stderr)
            return 0
        print(f"[study] {trained} of {len(runs)} runs trained, {len(runs) - trained} were finished", file=sys.stderr)
    out = Path(study.out_dir)
    summary = summarize(runs)
    summary["study"] = {"config": str(args.config), "quick": args.quick, "out_dir": str(out)}
    write_summary(summary, out / "summary.json")
    table = markdown_table(summary)
    (out / "summary.md").write_text(table)
    plots = plot_study(summary, out)
    print(table)
    print(f"[study] wrote {out / 'summary.json'}, {out / 'summary.md'}, "
          + ", ".join(str(p) for p in plots) + f"; TensorBoard: tensorboard --logdir {out / 'tensorboard'}",
          file=sys.stderr)
    return 0
