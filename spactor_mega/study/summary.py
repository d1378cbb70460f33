"""A study's numbers, from its runs' metrics files: curves per seed, their mean and spread per
arm, what each SpacTor arm needs to reach the SC arm's final loss, the hybrid phase's signals and
its measured step cost. Pure Python over the JSON-lines records the trainer writes.

- The quality curve is D's clean held-out SC loss (``valid/sc_loss``) and target-token accuracy.
- Cumulative training FLOPs at a step are the sum of the FLOPs model's figure of every step trained
  (``flops_per_step``: G and the RTD head counted in the hybrid steps only).
- RTD's prior is the loss of a head that predicts only the replaced fraction p: H(p) =
  -p ln p - (1-p) ln(1-p); an RTD loss at the prior means D learned nothing from RTD.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from spactor_mega.curriculum import Phase
from spactor_mega.errors import UserError
from spactor_mega.study.plan import ArmRun
from spactor_mega.training.tau_signals import binary_entropy

QUALITY = ("sc_loss", "sc_accuracy")
SIGNALS = ("rtd_loss", "rtd_prior", "rtd_recall", "mlm_accuracy", "replaced_fraction")


def read_records(path: Path) -> dict[str, dict[int, dict]]:
    """``{split: {step: record}}``; of a step logged twice (a resumed run) the last record counts."""
    records: dict[str, dict[int, dict]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no metrics file; rerun the study to train this arm") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.setdefault(record["split"], {})[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a metrics record (a JSON object with split and step); "
                            "delete the arm's folder and rerun the study to retrain it") from None
    return records


def run_curve(run: ArmRun) -> dict:
    """One seed of one arm: eval points with quality, cumulative FLOPs and wall-clock, the hybrid
    signals at each hybrid eval point, and the median step time and FLOPs of each phase."""
    path = run.metrics_file
    records = read_records(path)
    train = records.get("train", {})
    last = run.config.train.steps
    missing = [s for s in range(1, last + 1) if s not in train]
    if missing:
        raise UserError(f"{path}: no record of training step {missing[0]} (of {last}); the arm did not finish: "
                        "rerun the study to resume it")
    flops, wall = [0.0], [0.0]
    for step in range(1, last + 1):
        flops.append(flops[-1] + train[step]["flops_per_step"])
        wall.append(wall[-1] + train[step]["step_time_s"])
    curve: dict = {"step": [], "flops": [], "wall_s": [], **{k: [] for k in QUALITY}, "extra": {}, "signals": []}
    for step, record in sorted(records.get("valid", {}).items()):
        if step > last:
            continue
        curve["step"].append(step)
        curve["flops"].append(flops[step])
        curve["wall_s"].append(wall[step])
        for key in QUALITY:
            curve[key].append(record.get(key, math.nan))
        if "rtd_loss" in record:
            curve["signals"].append({"step": step, **{k: record[k] for k in SIGNALS if k in record},
                                     "rtd_prior": binary_entropy(record.get("replaced_fraction", 0.0))})
    for split in (Path(prefix).name for prefix in run.config.data.eval_data):  # the extra evaluation sets
        by_step = records.get(split, {})
        curve["extra"][split] = [by_step[s]["sc_loss"] for s in curve["step"] if s in by_step]
    # the run's tau: its first SC-only step (0-based; record s is the s-th step), or its last step + 1
    curve["tau"] = next((s - 1 for s in range(1, last + 1) if train[s]["phase"] == Phase.SC_ONLY.value), last)
    curve["phase"] = {}
    for phase in Phase:
        steps = [train[s] for s in range(1, last + 1) if train[s]["phase"] == phase.value]
        # each phase's first step pays one-off work (compilation, G's release): left out
        times = [r["step_time_s"] for r in steps[1:]]
        if times:
            curve["phase"][phase.name] = {"steps": len(steps), "median_step_s": statistics.median(times),
                                          "flops_per_step": steps[-1]["flops_per_step"]}
    return curve


def crossing(xs: list[float], ys: list[float], target: float) -> Optional[float]:
    """The first x where the piecewise-linear curve (xs, ys) falls to ``target``; None if it never does."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[ArmRun]) -> dict:
    """The study's summary (JSON-serialisable): per arm its seeds' curves and their aggregates."""
    by_arm: dict[str, list[ArmRun]] = {}
    for run in runs:
        by_arm.setdefault(run.arm.name, []).append(run)
    curves = {name: {r.seed: run_curve(r) for r in arm_runs} for name, arm_runs in by_arm.items()}
    arms = []
    for name, arm_runs in by_arm.items():
        arm = arm_runs[0].arm
        seeds = curves[name]
        steps = sorted(set.intersection(*(set(c["step"]) for c in seeds.values())))
        mean_curve = {"step": steps}
        for key in ("flops", "wall_s", *QUALITY):
            at = [[c[key][c["step"].index(s)] for c in seeds.values()] for s in steps]
            mean_curve[key] = [mean_std(v)["mean"] for v in at]
            mean_curve[f"{key}_std"] = [mean_std(v)["std"] for v in at]
        final = {key: mean_std([c[key][-1] for c in seeds.values()]) for key in QUALITY}
        final["extra"] = {split: mean_std([c["extra"][split][-1] for c in seeds.values() if c["extra"].get(split)])
                          for split in next(iter(seeds.values()))["extra"]}
        final["wall_s"] = mean_std([c["wall_s"][-1] for c in seeds.values()])
        final["flops"] = next(iter(seeds.values()))["flops"][-1]
        tau = arm.tau if isinstance(arm.tau, str) else (arm.tau if math.isfinite(arm.tau) else "inf")
        arms.append({
            "name": name, "tau": tau, "generator": dict(arm.generator), "seeds": sorted(seeds),
            "chosen_tau": {str(seed): c["tau"] for seed, c in seeds.items()} if tau == "auto" else None,
            "steps": arm_runs[0].config.train.steps, "curve": mean_curve, "final": final,
            "signals": _signals(seeds), "step_cost": _step_cost(seeds, curves.get("sc")),
            "runs": {str(seed): curve for seed, curve in seeds.items()},
        })
    summary = {"arms": arms, "target": None}
    sc = next((a for a in arms if a["tau"] == 0), None)
    if sc is not None and sc["final"]["sc_loss"]["mean"] is not None:
        target = sc["final"]["sc_loss"]["mean"]
        summary["target"] = {"sc_loss": target, "steps": sc["steps"], "flops": sc["final"]["flops"]}
        # Paired by seed (every arm of a seed has the same initialisation and data order): each seed's
        # target is the SC arm's final loss of that seed, so the seed-to-seed spread the arms share cancels
        sc_final = {seed: c["sc_loss"][-1] for seed, c in curves[sc["name"]].items()}
        for arm in arms:
            paired = {seed: c for seed, c in curves[arm["name"]].items() if seed in sc_final}
            reached = [(crossing(c["step"], c["sc_loss"], sc_final[seed]),
                        crossing(c["flops"], c["sc_loss"], sc_final[seed])) for seed, c in paired.items()]
            arm["reach"] = {"steps": mean_std([s for s, _ in reached]), "flops": mean_std([f for _, f in reached]),
                            "seeds": len(reached)}
            arm["final_vs_sc"] = mean_std([c["sc_loss"][-1] - sc_final[seed] for seed, c in paired.items()])
            arm["curve"]["minus_sc"], arm["curve"]["minus_sc_std"] = _paired_difference(
                arm["curve"]["step"], paired, curves[sc["name"]])
    _against_best_fixed_tau(arms, curves)
    return summary


def _against_best_fixed_tau(arms: list[dict], curves: dict) -> None:
    """For each tau-auto arm: per seed, its final SC loss minus that of the best fixed-tau arm (tau > 0,
    inf included, base generator) of the same seed, and which arm that was."""
    fixed = [a for a in arms if a["tau"] not in (0, "auto") and not a["generator"]]
    for arm in (a for a in arms if a["tau"] == "auto"):
        differences, best = [], {}
        for seed, curve in curves[arm["name"]].items():
            finals = {f["name"]: curves[f["name"]][seed]["sc_loss"][-1] for f in fixed if seed in curves[f["name"]]}
            if finals:
                best[str(seed)] = min(finals, key=finals.get)
                differences.append(curve["sc_loss"][-1] - finals[best[str(seed)]])
        arm["final_vs_best_fixed"] = mean_std(differences)
        arm["best_fixed"] = best


def _paired_difference(steps: list[int], curves: dict, sc_curves: dict) -> tuple[list, list]:
    """At each eval step: the arm's SC loss minus the SC arm's of the same seed, mean and std over seeds."""
    def loss_at(curve: dict, step: int) -> float:
        return curve["sc_loss"][curve["step"].index(step)]

    means, stds = [], []
    for step in steps:
        stat = mean_std([loss_at(c, step) - loss_at(sc_curves[seed], step)
                         for seed, c in curves.items() if step in sc_curves[seed]["step"]])
        means.append(stat["mean"])
        stds.append(stat["std"])
    return means, stds


def _signals(seeds: dict) -> Optional[dict]:
    """The hybrid signals at each seed's last hybrid eval point, averaged over seeds."""
    last = [c["signals"][-1] for c in seeds.values() if c["signals"]]
    if not last:
        return None
    return {"step": last[0]["step"], **{k: mean_std([s.get(k) for s in last]) for k in SIGNALS}}


def _step_cost(seeds: dict, sc_curves: Optional[dict]) -> Optional[dict]:
    """Measured hybrid/SC step-time ratio beside the FLOPs model's: within the run where it has both
    phases, else (tau = inf) against the SC arm's SC steps of the same seed."""
    ratios, model = [], None
    for seed, curve in seeds.items():
        hybrid = curve["phase"].get(Phase.HYBRID.name)
        sc = curve["phase"].get(Phase.SC_ONLY.name)
        if sc is None and sc_curves and seed in sc_curves:
            sc = sc_curves[seed]["phase"].get(Phase.SC_ONLY.name)
        if hybrid and sc:
            ratios.append(hybrid["median_step_s"] / sc["median_step_s"])
            model = hybrid["flops_per_step"] / sc["flops_per_step"]
    if not ratios:
        return None
    return {"measured": mean_std(ratios), "flops_model": model}


def write_summary(summary: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(summary, indent=1) + "\n")
