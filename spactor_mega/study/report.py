"""A study's summary as people read it: a markdown table and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from spactor_mega.plan.flops import format_flops  # noqa: E402


def _pm(stat: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:{'+' if signed else ''}.{digits}f} ± {stat['std']:.{digits}f}"


def _reach(arm: dict, key: str, total: float, fmt) -> str:
    reach = arm.get("reach")
    if arm["tau"] == 0:
        return "(the target)"
    if not reach:
        return "-"
    stat = reach[key]
    if not stat["n"]:
        return f"not reached (0/{reach['seeds']})"
    text = f"{fmt(stat['mean'])} ± {fmt(stat['std'])} ({stat['mean'] / total:.0%})"
    return text if stat["n"] == reach["seeds"] else f"{text}, {stat['n']}/{reach['seeds']} seeds"


def _tau_text(arm: dict) -> str:
    """A fixed tau, inf, or for a tau-auto arm the tau each seed chose."""
    if arm["tau"] == "auto":
        return "auto: " + ", ".join(str(arm["chosen_tau"][str(seed)]) for seed in arm["seeds"])
    return f"{arm['tau']:g}" if arm["tau"] != "inf" else "inf"


def _fixed_tau_within(arm: dict) -> bool:
    """Whether the arm has one tau, inside its run (drawn dashed)."""
    return isinstance(arm["tau"], (int, float)) and 0 < arm["tau"] < arm["steps"]


def markdown_table(summary: dict) -> str:
    """Per arm: final clean SC loss (mean ± std over seeds, its difference from the SC arm's final
    loss of the same seed and, for a tau-auto arm, from the best fixed tau's of the same seed), SC accuracy, the steps and FLOPs it
    needs to reach the SC arm's final loss (share of the SC arm's), measured vs modelled step cost,
    the hybrid phase's signals, and the training wall-clock."""
    target = summary.get("target")
    rows = [
        "| arm | tau | seeds | final SC loss | minus SC arm's (same seed) | minus best fixed tau's (same seed) "
        "| final SC accuracy "
        "| steps to SC arm's final loss (same seed) | FLOPs to it | hybrid/SC step cost: measured (FLOPs model) "
        "| RTD loss (prior) at last hybrid eval | RTD recall | G MLM accuracy | train wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in summary["arms"]:
        signals, cost = arm.get("signals"), arm.get("step_cost")
        steps_total = target["steps"] if target else 1
        flops_total = target["flops"] if target else 1
        rows.append("| " + " | ".join([
            arm["name"], _tau_text(arm), str(len(arm["seeds"])),
            _pm(arm["final"]["sc_loss"]), _pm(arm.get("final_vs_sc"), signed=True) if arm["tau"] != 0 else "-",
            _pm(arm.get("final_vs_best_fixed"), signed=True) if arm["tau"] == "auto" else "-",
            _pm(arm["final"]["sc_accuracy"]),
            _reach(arm, "steps", steps_total, lambda v: f"{v:.0f}"),
            _reach(arm, "flops", flops_total, format_flops),
            f"{_pm(cost['measured'], 2)} ({cost['flops_model']:.2f})" if cost else "-",
            f"{_pm(signals['rtd_loss'])} ({signals['rtd_prior']['mean']:.3f})" if signals else "-",
            _pm(signals["rtd_recall"]) if signals else "-",
            _pm(signals["mlm_accuracy"]) if signals else "-",
            _pm(arm["final"]["wall_s"], 0),
        ]) + " |")
    lines = rows
    if target:
        lines = [f"The SC arm's final clean validation SC loss is {target['sc_loss']:.4f} (mean over seeds) after "
                 f"{target['steps']} steps ({format_flops(target['flops'])}); each seed of an arm is compared with the "
                 "SC arm's run of the same seed (same initialisation, same data order); percentages are of the SC "
                 "arm's steps and FLOPs; ± is the standard deviation over seeds.", "", *rows]
    lines += auto_tau_rows(summary)
    extra = sorted({split for arm in summary["arms"] for split in arm["final"]["extra"]})
    if extra:
        lines += ["", "| arm | " + " | ".join(f"final SC loss on {s}" for s in extra) + " |",
                  "|---|" + "---|" * len(extra)]
        for arm in summary["arms"]:
            lines.append(f"| {arm['name']} | " + " | ".join(_pm(arm["final"]["extra"].get(s)) for s in extra) + " |")
    return "\n".join(lines) + "\n"


def nearest_fixed_tau(chosen: int, summary: dict) -> Optional[str]:
    """The fixed-tau arm (base generator) whose tau is nearest a chosen one, or the two of a tie joined by " / ";
    inf counts as the run's length (hybrid throughout)."""
    fixed = [a for a in summary["arms"] if a["tau"] not in (0, "auto") and not a["generator"]]
    if not fixed:
        return None
    distance = {a["name"]: abs((a["steps"] if a["tau"] == "inf" else a["tau"]) - chosen) for a in fixed}
    return " / ".join(name for name, d in distance.items() if d == min(distance.values()))


def auto_tau_rows(summary: dict) -> list[str]:
    """Per seed and tau-auto arm: the tau it chose, the fixed-tau arm nearest that choice, the best fixed-tau
    arm of the same seed, and the final SC loss against both that arm's and the SC arm's (same seed); whether
    a signal predicts the best fixed tau is whether the two arms agree."""
    autos = [a for a in summary["arms"] if a["tau"] == "auto"]
    if not autos:
        return []
    arms = {a["name"]: a for a in summary["arms"]}
    sc = next((a for a in summary["arms"] if a["tau"] == 0), None)
    rows = ["", "tau auto, per seed: the nearest fixed tau is the fixed-tau arm whose tau is closest to the one "
            "chosen (inf: the run's length); the best is the fixed-tau arm with the lowest final SC loss of that seed.",
            "", "| seed | arm | chosen tau | nearest fixed tau | best fixed tau | final SC loss | minus best fixed tau's "
            "| minus SC arm's |", "|---|---|---|---|---|---|---|---|"]
    for seed in autos[0]["seeds"]:
        for arm in autos:
            chosen, final = arm["chosen_tau"][str(seed)], arm["runs"][str(seed)]["sc_loss"][-1]
            best = arm.get("best_fixed", {}).get(str(seed))
            best_final = arms[best]["runs"][str(seed)]["sc_loss"][-1] if best else None
            sc_final = sc["runs"][str(seed)]["sc_loss"][-1] if sc and str(seed) in sc["runs"] else None
            rows.append("| " + " | ".join([
                str(seed), arm["name"], str(chosen), nearest_fixed_tau(chosen, summary) or "-", best or "-",
                f"{final:.4f}", f"{final - best_final:+.4f}" if best_final is not None else "-",
                f"{final - sc_final:+.4f}" if sc_final is not None else "-"]) + " |")
    return rows


def plot_study(summary: dict, out_dir: Path) -> list[Path]:
    """loss_vs_step.png, loss_vs_flops.png (mean ± std band over seeds, tau dashed),
    loss_minus_sc_vs_step.png (each arm against the SC arm, paired by seed) and rtd_vs_prior.png
    (the hybrid arms' validation RTD loss against its prior)."""
    out_dir = Path(out_dir)
    written = []
    for axis, label, name in (("step", "training step", "loss_vs_step.png"),
                              ("flops", "cumulative training FLOPs (FLOPs model)", "loss_vs_flops.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, arm in enumerate(summary["arms"]):
            c = arm["curve"]
            color = f"C{i}"
            _band(ax, c[axis], c["sc_loss"], c["sc_loss_std"], color, f"{arm['name']} ({len(arm['seeds'])} seeds)")
            tau = arm["tau"]
            if _fixed_tau_within(arm):
                x = tau if axis == "step" else _at(c["step"], c["flops"], tau)
                ax.axvline(x, color=color, linestyle="--", linewidth=1)
        if summary.get("target"):
            ax.axhline(summary["target"]["sc_loss"], color="gray", linestyle=":", linewidth=1,
                       label="SC arm's final loss (the target)")
        _zoom(ax, summary)
        written.append(_save(fig, ax, label, "clean validation SC loss",
                             "SpacTor study: held-out span-corruption loss (dashed: tau)", out_dir / name))
    if summary.get("target"):
        written.append(_plot_paired_difference(summary, out_dir / "loss_minus_sc_vs_step.png"))
    written.append(_plot_rtd_vs_prior(summary, out_dir / "rtd_vs_prior.png"))
    return written


def _plot_rtd_vs_prior(summary: dict, path: Path) -> Path:
    """The hybrid arms' validation RTD loss (mean over seeds) and its prior at each hybrid eval point."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, arm in enumerate(summary["arms"]):
        points = [p for seed in arm["runs"].values() for p in seed["signals"]]
        steps = sorted({p["step"] for p in points})
        for key, style in (("rtd_loss", "-"), ("rtd_prior", ":")):
            values = [statistics.fmean(p[key] for p in points if p["step"] == s) for s in steps]
            if values:
                ax.plot(steps, values, style, color=f"C{i}", label=f"{arm['name']} {key.replace('_', ' ')}")
    return _save(fig, ax, "training step", "validation RTD loss (dotted: its prior)",
                 "Did D learn from replaced-token detection? (below the prior: yes)", path, legend_size=7)


def _plot_paired_difference(summary: dict, path: Path) -> Path:
    """Each arm's loss minus the SC arm's of the same seed (below 0: better than SC at that step):
    the seed-to-seed spread that swamps the loss curves cancels in the pairs."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, arm in enumerate(summary["arms"]):
        c = arm["curve"]
        if arm["tau"] == 0 or not c.get("minus_sc"):
            continue
        _band(ax, c["step"], c["minus_sc"], c["minus_sc_std"], f"C{i}", f"{arm['name']} ({len(arm['seeds'])} seeds)")
        if _fixed_tau_within(arm):
            ax.axvline(arm["tau"], color=f"C{i}", linestyle="--", linewidth=1)
    ax.axhline(0, color="gray", linewidth=1)
    return _save(fig, ax, "training step", "SC loss minus the SC arm's (same seed)",
                 "SpacTor arms against SC only, paired by seed (below 0: ahead; dashed: tau)", path)


def _band(ax, xs: list, mean: list, std: list, color: str, label: str) -> None:
    """A mean curve with its ±1 std band over seeds."""
    ax.plot(xs, mean, color=color, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=color, alpha=0.2, linewidth=0)


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, legend_size: int = 8) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _at(xs: list, ys: list, x: float) -> float:
    """ys linearly interpolated at x."""
    for i in range(1, len(xs)):
        if xs[i] >= x:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1]


def _zoom(ax, summary: dict) -> None:
    """The y-range of the curves after their first eval point (step 0's loss is off any useful scale)."""
    later = [v for arm in summary["arms"] for v in arm["curve"]["sc_loss"][1:] if v is not None and math.isfinite(v)]
    if later:
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
