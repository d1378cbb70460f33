"""What a study runs: its config, and the arms x seeds it expands to, each an ordinary train config.

A study compares, on one base train config, span corruption only (tau = 0), SpacTor(tau) at the
taus given, SpacTor(inf) (hybrid throughout), SpacTor(auto) arms whose tau the run's own signals
choose (``spactor.tau: auto``, one arm per signal) and, on a generator axis, SpacTor(taus[0]) with
other generator sizes; every arm runs each seed, with the same steps and, for one seed, the same data
order (the data order is a function of ``train.seed`` only). Pure: no torch, no process group.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from spactor_mega.config import AutoTauConfig, Config, ConfigError, config_from_dict, load_yaml, read_yaml, set_field


@dataclass
class StudyConfig:
    base: str  # the train YAML every arm starts from
    out_dir: str = "runs/study"
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    taus: list = field(default_factory=list)  # SpacTor(tau) arms; SC only (tau 0) and SpacTor(inf) always run
    # The generator axis: each entry ({generator field: value}) adds a SpacTor(taus[0]) arm with that generator
    generators: list = field(default_factory=list)
    # tau-auto arms: each entry ({spactor.auto_tau field: value}, with its signal) adds an arm spactor-auto-<signal>
    auto: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # {"section.field": value} for every arm
    eval_data: list = field(default_factory=list)  # extra held-out indexed datasets, evaluated beside valid
    quick: dict = field(default_factory=dict)  # --quick: study fields replaced (``overrides`` merged)


@dataclass(frozen=True)
class Arm:
    name: str
    tau: float | str  # a step, inf, or "auto"
    generator: tuple = ()  # ((field, value), ...) over the base generator
    auto_tau: tuple = ()  # ((spactor.auto_tau field, value), ...) of a tau-auto arm


@dataclass
class ArmRun:
    """One seed of one arm: an ordinary train config writing into its own folder."""

    arm: Arm
    seed: int
    folder: Path
    config: Config

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return Path(self.config.logging.metrics_file)


def load_study(path: str | Path, quick: bool = False) -> StudyConfig:
    path = Path(path)
    doc = read_yaml(path, "study config")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    if not isinstance(doc, dict) or "base" not in doc:
        raise ConfigError(f"{path}: a study config is a mapping with at least `base: <train config YAML>`")
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    study = StudyConfig(**doc)
    if quick:
        if not study.quick:
            raise ConfigError(f"{path}: --quick needs a `quick:` section (the study fields a quick run replaces)")
        extra = sorted(set(study.quick) - known)
        if extra:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(extra)} in `quick`")
        for key, value in study.quick.items():
            setattr(study, key, {**study.overrides, **value} if key == "overrides" else value)
    _check(study, path)
    return study


def _check(study: StudyConfig, path: Path) -> None:
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers")
    for tau in study.taus:
        if not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ConfigError(f"{path}: taus holds {tau!r}; give finite steps > 0 (tau 0 and inf are always run)")
    if study.generators and not study.taus:
        raise ConfigError(f"{path}: the generator axis runs at taus[0]; give at least one tau")
    auto_fields = {f.name for f in dataclasses.fields(AutoTauConfig)}
    signals = [entry.get("signal") for entry in study.auto if isinstance(entry, dict)]
    for entry in study.auto:
        if not isinstance(entry, dict) or "signal" not in entry or set(entry) - auto_fields:
            raise ConfigError(f"{path}: each auto entry is a mapping of spactor.auto_tau fields ({', '.join(sorted(auto_fields))}) "
                              f"with its signal, got {entry!r}")
    if len(set(signals)) != len(signals):
        raise ConfigError(f"{path}: auto arms are named by their signal; give each signal once, got {signals}")
    names = {f.name for f in dataclasses.fields(Config().generator)}
    for entry in study.generators:
        if not isinstance(entry, dict) or not entry or set(entry) - names:
            raise ConfigError(f"{path}: each generators entry is a mapping of generator fields "
                              f"({', '.join(sorted(names))}), got {entry!r}")


def study_arms(study: StudyConfig) -> list[Arm]:
    arms = [Arm("sc", 0.0)]
    arms += [Arm(f"spactor-tau{_number(tau)}", float(tau)) for tau in study.taus]
    arms.append(Arm("spactor-inf", math.inf))
    arms += [Arm(f"spactor-auto-{entry['signal']}", "auto", auto_tau=tuple(entry.items())) for entry in study.auto]
    for entry in study.generators:
        label = "-".join(f"{k}{_number(v)}" for k, v in entry.items())
        arms.append(Arm(f"spactor-tau{_number(study.taus[0])}-gen-{label}", float(study.taus[0]),
                        tuple(entry.items())))
    return arms


def arm_runs(study: StudyConfig, arms: Optional[list[str]] = None, seeds: Optional[list[int]] = None) -> list[ArmRun]:
    """Every (arm, seed) of the study, or of the named ``arms`` / ``seeds`` only, in order."""
    base = load_yaml(study.base)
    base = config_from_dict(_sections(study.overrides, "overrides"), "study overrides", base)
    every = study_arms(study)
    chosen = every if arms is None else [a for a in every if a.name in arms]
    if arms is not None and len(chosen) != len(set(arms)):
        missing = sorted(set(arms) - {a.name for a in every})
        raise ConfigError(f"--arms: no arm {', '.join(missing)} in this study; its arms: "
                          f"{', '.join(a.name for a in every)}")
    for seed in seeds or []:
        if seed not in study.seeds:
            raise ConfigError(f"--seeds: {seed} is not one of the study's seeds {study.seeds}")
    out = Path(study.out_dir)
    runs = []
    for arm in chosen:
        for seed in seeds or study.seeds:
            folder = out / arm.name / f"seed{seed}"
            cfg = copy.deepcopy(base)
            cfg.spactor.tau = arm.tau
            for key, value in arm.generator:
                setattr(cfg.generator, key, value)
            for key, value in arm.auto_tau:
                set_field(cfg, f"spactor.auto_tau.{key}", value, "study auto")
            cfg.train.seed = int(seed)
            cfg.train.save_dir = str(folder / "checkpoints")
            cfg.train.resume = "auto"  # each arm resumes where it stopped
            cfg.data.eval_data = [*cfg.data.eval_data, *study.eval_data]
            cfg.logging.tensorboard_dir = str(out / "tensorboard" / arm.name / f"seed{seed}")
            cfg.logging.metrics_file = str(folder / "metrics.jsonl")
            # W&B (when the base config names a project): the study's runs in one group, named by arm and seed
            cfg.logging.wandb_group = out.resolve().name
            cfg.logging.wandb_run_name = f"{arm.name}-seed{seed}"
            cfg.logging.wandb_tags = [*cfg.logging.wandb_tags, arm.name, f"seed{seed}"]
            runs.append(ArmRun(arm, int(seed), folder, cfg))
    return runs


def write_config(run: ArmRun) -> Path:
    """The arm's full train config as YAML: `spactor train --config` it to rerun the arm by hand."""
    run.folder.mkdir(parents=True, exist_ok=True)
    run.config_file.write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    return run.config_file


def _sections(flat: dict[str, Any], where: str) -> dict[str, dict]:
    """``{"train.steps": 8}`` -> ``{"train": {"steps": 8}}``."""
    nested: dict[str, dict] = {}
    for key, value in flat.items():
        section, dot, name = str(key).partition(".")
        if not dot:
            raise ConfigError(f"study {where}: {key!r} must be section.field, e.g. train.steps")
        nested.setdefault(section, {})[name] = value
    return nested


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
