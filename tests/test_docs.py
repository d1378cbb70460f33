"""The documentation is checked like code: the site builds in strict mode, every ``spactor`` command line
in README.md and docs/ parses with the real CLI parser (subcommand, flags, config flags against the
config schema with their types), every config field the docs name exists, the short commands run, and
the generated configuration reference agrees with the schema and with validate()."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spactor_mega.cli import SUBCOMMANDS, build_parser, main
from spactor_mega.config import Config, ConfigError, config_from_args, field_comments, leaf_fields, set_field
from spactor_mega.plan.config_reference import choices_of, field_docs
from spactor_mega.plan.validate import validate

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FIELDS = set(leaf_fields())
SECTIONS = "|".join(f.name for f in dataclasses.fields(Config))
TRAIN_PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "base" not in yaml.safe_load(p.read_text()))

# Placeholders the docs write in commands, and a value of the right kind for each.
PLACEHOLDERS = {"PRESET": "configs/t5-base.yaml", "COMMAND": "train", "N": "8", "M": "1", "V": "2", "F": "2",
                "X": "t5", "CKPT": "runs/demo/checkpoints", "OUT": "out", "HF_DIR": "hf", "PREFIX": "data/x"}
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")  # fenced blocks of commands; others hold output or pictures
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # an inline code span, possibly wrapped over lines


def _fenced_lines(text: str) -> list[str]:
    """The logical lines of the fenced shell blocks (``\\`` continuations joined)."""
    out = []
    for block in FENCE.findall(text):
        head, body = block.split("\n", 1)
        if head.strip().strip("`").strip() in SHELL:
            out += body.rsplit("```", 1)[0].replace("\\\n", " ").splitlines()
    return out


def _inline_spans(text: str) -> list[str]:
    return [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]


def spactor_argv(line: str) -> list[str] | None:
    """The ``spactor`` arguments a documented line runs: ``spactor ...``, ``torchrun ... -m spactor_mega.cli
    ...``, or a launcher script that passes its arguments to ``spactor train``; None for other lines."""
    line = re.sub(r"\[[^\]]*\.\.\.\]", "", line)  # a synopsis' "[--section.field VALUE ...]"
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0] == "spactor":
        argv = words[1:]
    elif words[0] == "torchrun" and "spactor_mega.cli" in words:
        argv = words[words.index("spactor_mega.cli") + 1:]
    elif words[0] in ("launch/torchrun.sh", "launch/deepspeed.sh"):
        argv = ["train", *words[1:]]
    elif words[0] == "sbatch" and "launch/slurm.sbatch" in words:
        argv = ["train", *words[words.index("launch/slurm.sbatch") + 1:]]
    else:
        return None
    return [PLACEHOLDERS.get(w, w) for w in argv]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command line of the README and the docs: each line of a code block, and each
    inline code span that names a flag."""
    found = []
    for path in DOCS:
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for line in _fenced_lines(text):
            argv = spactor_argv(line.strip())
            if argv is not None:
                found.append((where, argv))
        for span in _inline_spans(text):
            argv = spactor_argv(span)
            if argv is not None and any(a.startswith("-") for a in argv):
                found.append((where, argv))
    return found


COMMANDS = documented_commands()


def parse(argv: list[str]):
    """Parses ``argv`` as ``spactor`` would, config flags included; a refusal is an AssertionError with
    argparse's or the config's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None
    _check_flags_are_spelled_out(argv)
    if args.command in ("train", "prepare", "plan"):
        if args.config and re.search(r"(^|/)[A-Z_]+/", args.config):
            args.config = None  # a placeholder folder (OUT/config.yaml): check the flags against the schema only
        try:
            config_from_args(args)  # --section.field: the field exists, the value has its type; --config is read
        except ConfigError as e:
            raise AssertionError(str(e)) from None
    return args


def _check_flags_are_spelled_out(argv: list[str]) -> None:
    """argparse accepts a flag's prefix (``--world-size`` for ``--world-sizes``); a documented flag must be
    one of the command's own, as its ``--help`` lists them."""
    path = argv[:2] if len(argv) > 1 and not argv[1].startswith("-") else argv[:1]
    with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
        build_parser(argv[0]).parse_args([*path, "--help"])
    for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w.-])", help_text.getvalue()):
            raise AssertionError(f"{flag} is not a flag of `spactor {' '.join(path)}`")


def test_the_docs_have_commands_of_every_kind():
    """The extraction finds what the docs hold (an empty list would pass every check below)."""
    subcommands = {argv[0] for _, argv in COMMANDS}
    assert {"tokenizer", "preprocess", "prepare", "train", "convert", "study", "plan"} <= subcommands
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[" ".join(a)[:80] for _, a in COMMANDS])
def test_documented_command_parses(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    if argv[1:] == ["--help"]:  # `spactor COMMAND --help`: parsing it would print the help
        assert argv[0] in SUBCOMMANDS, f"{where}: no subcommand {argv[0]}"
        return
    try:
        parse(argv)
    except AssertionError as e:
        pytest.fail(f"{where}: `spactor {shlex.join(argv)}`: {e}")


def test_config_flags_in_the_text_parse():
    """``--section.field VALUE`` written in the text (not a whole command): the field exists and the value
    has its type. The Bad input page shows wrong values on purpose."""
    flags = re.compile(rf"^--(?:{SECTIONS})\.\w+")
    checked = 0
    for path in DOCS:
        if path.name == "bad-input.md":
            continue
        for span in _inline_spans(path.read_text()):
            if flags.match(span):
                words = [PLACEHOLDERS.get(w, w) for w in shlex.split(span)]
                try:
                    parse(["train", *words])
                except AssertionError as e:
                    pytest.fail(f"{path.relative_to(ROOT)}: `{span}`: {e}")
                checked += 1
    assert checked >= 10


def test_the_parser_refuses_what_the_docs_check_for(monkeypatch):
    """The check can fail: a renamed flag, a config field that does not exist, a value of the wrong type."""
    monkeypatch.chdir(ROOT)
    for argv in (["train", "--config", "configs/demo-cpu.yaml", "--no-such-flag", "8"],
                 ["train", "--config", "configs/demo-cpu.yaml", "--dry-run", "--world", "8"],  # a prefix
                 ["train", "--train.stepz", "3"], ["train", "--train.steps", "ten"],
                 ["preprocess", "--input", "x", "--output-prefix", "y", "--tokenizer", "t", "--workers", "many"]):
        with pytest.raises(AssertionError):
            parse(argv)


# Named on the Bad input page as what a user gets wrong
DELIBERATELY_UNKNOWN = {"train.stepz"}


def test_every_config_field_the_docs_name_exists():
    assert not DELIBERATELY_UNKNOWN & FIELDS
    field = re.compile(rf"(?:(?<![\w/.-])|(?<=--))((?:{SECTIONS})(?:\.\w+)+)")
    subsections = {name.rsplit(".", 1)[0] for name in FIELDS}
    unknown = []
    for path in DOCS:
        text = path.read_text()
        spans = _inline_spans(text) + _fenced_lines(text)
        for span in spans:
            for name in field.findall(span):
                if name not in FIELDS | subsections | DELIBERATELY_UNKNOWN:
                    unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, "config fields the docs name that config.py does not have:\n" + "\n".join(sorted(set(unknown)))


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_runs(command):
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: spactor" in out.getvalue()


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_dry_run_of_each_preset_runs(preset, monkeypatch):
    monkeypatch.chdir(ROOT)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", "--config", f"configs/{preset}", "--dry-run"]) == 0
    assert out.getvalue()


DRY_RUNS = sorted({shlex.join(argv) for _, argv in COMMANDS if argv[0] == "train" and "--dry-run" in argv})


@pytest.mark.parametrize("command", DRY_RUNS)
def test_documented_dry_run_runs(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(shlex.split(command)) == 0, command


def test_every_field_has_a_description():
    comments = field_comments()
    assert set(comments) == FIELDS
    assert not [name for name, text in comments.items() if not text], "fields without a comment in config.py"


def _bogus(name: str, value):
    cfg = Config()
    if name.startswith("deepspeed."):
        cfg.train.engine = "deepspeed"
    if name.startswith("spactor.auto_tau."):
        cfg.spactor.tau = "auto"
    set_field(cfg, name, value)
    return cfg


@pytest.mark.parametrize("doc", [d for d in field_docs() if d.choices and d.type != "bool"], ids=lambda d: d.name)
def test_allowed_values_in_the_reference_are_those_validate_names(doc):
    """The values a field's comment allows are those validate() names when it refuses another."""
    with pytest.raises(ConfigError) as refusal:
        validate(_bogus(doc.name, 7 if doc.type == "int" else "bogus"))
    message = str(refusal.value)
    assert doc.name in message
    assert all(re.search(rf"\b{re.escape(c)}\b", message) for c in doc.choices), (message, doc.choices)


MEGATRON_ONLY_SWITCHES = [d.name for d in field_docs() if d.engines == ("megatron",) and d.type == "bool"]
# What a switch needs to be valid on the Megatron engine
PREREQUISITES = {"parallel.sequence_parallel": {"parallel.tensor_model_parallel_size": 2},
                 "parallel.overlap_param_gather": {"parallel.distributed_optimizer": True}}


@pytest.mark.parametrize("name", MEGATRON_ONLY_SWITCHES)
def test_megatron_only_switches_are_refused_by_the_deepspeed_engine(name):
    assert len(MEGATRON_ONLY_SWITCHES) >= 4
    cfg = Config()
    for field_name, value in {name: True, **PREREQUISITES.get(name, {})}.items():
        set_field(cfg, field_name, value)
    validate(cfg, world_size=2)
    cfg.train.engine = "deepspeed"
    with pytest.raises(ConfigError, match="Megatron engine setting|train.engine=megatron"):
        validate(cfg, world_size=2)


def test_choices_are_read_from_the_comment():
    assert choices_of("none | cpu | nvme: where it lives") == ("none", "cpu", "nvme")
    assert choices_of("0 | 1 | 2 | 3: what ZeRO splits") == ("0", "1", "2", "3")
    assert choices_of("width of the hidden states") == ()


def test_the_readmes_links_exist():
    """The README is read on the forge, outside the site: its relative links must point at files."""
    links = [link.split("#", 1)[0] for link in re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
             if "://" not in link]
    assert links and not [link for link in links if not (ROOT / link).exists()]


def test_site_builds_in_strict_mode(tmp_path):
    """mkdocs build --strict: a broken link, a missing page or a bad snippet fails; the generated
    reference lists every field."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    reference = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    listed = set()
    for part in reference.split('<h2 id="')[1:]:  # one section each: its id, then its table
        section = part.split('"', 1)[0]
        listed |= {f"{section}.{name}" for name in re.findall(r"<tr>\s*<td><code>([\w.]+)</code></td>", part)}
    assert listed == FIELDS
    assert (tmp_path / "site" / "study-cpu" / "loss_vs_step.png").exists()
