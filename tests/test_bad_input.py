"""Bad input through the ``spactor`` command: one ``spactor CMD: error:`` line naming the field or
file and the fix, no traceback, and (for data) nothing built first. The "Bad input" table of the docs (docs/bad-input.md)
lists these beside the classes other tests cover."""

import dataclasses
import math
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from spactor_mega.cli import main
from spactor_mega.config import leaf_fields, load_yaml
from spactor_mega.data.prepare import ensure_data
from tests.training.test_training import run, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny training preset whose tokenizer and dataset exist (as tests/training's tiny_config)."""
    work = tmp_path_factory.mktemp("bad_input") / "run"
    cfg = tiny_config(work)
    ensure_data(cfg)
    path = work.parent / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return path, Path(cfg.data.train_data[0])


def refused(capsys, *argv: str) -> str:
    """Runs ``spactor ARGV`` in this process; returns its one error line (asserting there is one)."""
    rc = main(list(argv))
    err = capsys.readouterr()
    errors = [line for line in err.err.splitlines() if ": error: " in line]
    assert rc == 2 and len(errors) == 1, err.err
    assert "Traceback" not in err.err + err.out
    assert "[train] world" not in err.err + err.out  # refused before any model was built
    return errors[0]


def test_an_unknown_field_in_a_preset_is_named(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert refused(capsys, "train", "--config", str(bad)).startswith(
        f"spactor train: error: {bad}: unknown field train.stepz; known: ")


def test_a_missing_preset_is_named(tmp_path, capsys):
    assert refused(capsys, "train", "--config", str(tmp_path / "nope.yaml")) == \
        f"spactor train: error: {tmp_path / 'nope.yaml'}: config file not found"


def test_a_flag_value_of_the_wrong_type_names_the_flag(preset, capsys):
    line = refused(capsys, "train", "--config", str(preset[0]), "--train.steps", "ten")
    assert line == "spactor train: error: --train.steps: expected an integer, got 'ten'"


# Numeric fields for which 0 is a meaningful setting (none takes -1); every other 0, -1 and non-number is refused
LEGAL_ZERO = {
    "model.dropout", "spactor.mlm_fraction", "spactor.tau", "spactor.mlm_weight", "spactor.rtd_weight", "spactor.z_loss",
    "data.num_workers", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.adam_beta1",
    "optim.adam_beta2", "optim.clip_grad", "train.seed", "train.save_interval", "train.keep_last_checkpoints",
    "train.hang_factor", "train.eval_interval", "deepspeed.zero_stage",
}
# ... trained with 0 by other tests rather than by test_the_legal_zeros_train below
TRAINED_WITH_ZERO_ELSEWHERE = {
    "spactor.tau": "tests/training/test_training.py::test_flops_per_step_drop_to_the_sc_only_figure_at_tau (plain T5)",
    "deepspeed.zero_stage": "tests/training/test_bf16.py (zero0, fp32 and bf16)",
}


def numeric_fields() -> list[str]:
    def numeric(annotation) -> bool:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        return int in kinds or float in kinds
    return [name for name, (annotation, _) in leaf_fields().items() if numeric(annotation)]


def engine_flags(name: str) -> list[str]:
    """A DeepSpeed engine field is validated by the DeepSpeed engine (the Megatron engine ignores it)."""
    return ["--train.engine", "deepspeed"] if name.startswith("deepspeed.") else []


def test_every_numeric_field_refuses_zero_minus_one_and_a_non_number_in_one_line(preset, capsys, tmp_path):
    """Walks the schema as a new user would: each numeric field set to 0, -1 and ``ten`` by a flag, and to
    ``ten`` in a preset, under ``--dry-run``: one line naming the field from validation (so nothing is
    built), or, for the settings in LEGAL_ZERO, a dry run that passes (and test_the_legal_zeros_train)."""
    names = numeric_fields()
    assert LEGAL_ZERO <= set(names)
    base = yaml.safe_load(preset[0].read_text())
    for name in names:
        *sections, key = name.split(".")
        for value in ("0", "-1", "ten"):
            argv = ["train", "--config", str(preset[0]), *engine_flags(name), f"--{name}", value, "--dry-run"]
            if value == "0" and name in LEGAL_ZERO:
                assert main(argv) == 0, (name, capsys.readouterr().err)
                capsys.readouterr()
                continue
            line = refused(capsys, *argv)
            assert name in line, (name, value, line)
        doc = yaml.safe_load(yaml.safe_dump(base))
        leaf = doc
        for section in sections:
            leaf = leaf.setdefault(section, {})
        leaf[key] = "ten"
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(yaml.safe_dump(doc))
        line = refused(capsys, "train", "--config", str(bad), *engine_flags(name), "--dry-run")
        assert name in line, (name, line)


def test_numbers_yaml_reads_as_strings_are_numbers(preset, tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string: a numeric field parses it as the flag would."""
    doc = yaml.safe_load(preset[0].read_text())
    doc["optim"]["lr"], doc["train"]["steps"] = "1e-3", "12"
    path = tmp_path / "strings.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_yaml(path)
    assert (cfg.optim.lr, cfg.train.steps) == (1e-3, 12)


def test_the_legal_zeros_train(preset):
    """One short run with every legal 0 of LEGAL_ZERO at once (but those trained elsewhere): both phases, finite
    losses, no skipped step."""
    zeros = LEGAL_ZERO - set(TRAINED_WITH_ZERO_ELSEWHERE)
    cfg = tiny_config(preset[0].parent / "zeros", **{name.replace(".", "__"): 0 for name in zeros})  # preset's data
    assert cfg.spactor.tau == 4 and cfg.train.steps == 8
    history = run(cfg)["history"]
    assert [h["step"] for h in history] == list(range(1, 9))
    assert all(math.isfinite(h["loss"]) and h["skipped_steps"] == 0 for h in history), history


def test_a_world_size_that_tp_x_pp_does_not_divide(preset, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert refused(capsys, "train", "--config", str(preset[0]), "--parallel.tensor_model_parallel_size", "2") == (
        "spactor train: error: world size 3 is not divisible by tensor x pipeline parallel size 2x1; "
        "launch a multiple of TP*PP processes")


def test_a_hang_factor_that_is_no_multiple_of_the_median(preset, capsys):
    assert refused(capsys, "train", "--config", str(preset[0]), "--train.hang_factor", "0.5") == (
        "spactor train: error: train.hang_factor must be 0 (off) or above 1 (a multiple of the median step), got 0.5")


@pytest.mark.parametrize("flags, message", [
    (("--model.feed_forward", "gated-relu"),
     "model.feed_forward must be one of relu, gated-gelu, gated-silu, got 'gated-relu'"),
    (("--model.hf_model_type", "umt5"),
     "model.relative_attention_per_layer=False does not fit model.hf_model_type=umt5: UMT5 has a bias table per "
     "layer, T5 and mT5 one per stack; change one of them"),
    (("--model.hf_model_type", "mt5", "--model.tie_word_embeddings", "true"),
     "model.tie_word_embeddings=true with model.hf_model_type=mt5: HF's MT5 never rescales a tied head; use "
     "hf_model_type t5 for a tied model"),
])
def test_a_model_kind_that_no_t5_has_is_refused(preset, capsys, flags, message):
    assert refused(capsys, "train", "--config", str(preset[0]), *flags) == f"spactor train: error: {message}"


def test_lr_below_the_default_min_lr_is_our_line_not_megatrons_assert(preset):
    """As a user runs it: a fresh `spactor` process (before the check, Megatron's scheduler died in
    `assert self.max_lr >= self.min_lr`)."""
    run = subprocess.run([sys.executable, "-m", "spactor_mega.cli", "train", "--config", str(preset[0]),
                          "--optim.lr", "1e-9"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "spactor train: error: optim.min_lr=1e-05 must be in [0, optim.lr=1e-09]; lower optim.min_lr")
    assert "Traceback" not in run.stderr and "assert" not in run.stderr


def test_a_blend_prefix_that_does_not_exist_is_named(preset, capsys, tmp_path):
    blend = f"[0.5, {preset[1]}, 0.5, {tmp_path / 'c4_typo'}]"
    assert refused(capsys, "train", "--config", str(preset[0]), "--data.train_data", blend) == (
        f"spactor train: error: {tmp_path / 'c4_typo.idx'}: indexed dataset file not found; "
        "build it with `spactor preprocess`")


def test_blend_weights_that_are_not_numbers(preset, capsys):
    line = refused(capsys, "train", "--config", str(preset[0]), "--data.train_data", f"[{preset[1]}, 0.5]")
    assert "weights must be numbers ('0.7 prefixA 0.3 prefixB')" in line


@pytest.mark.parametrize("damage, message", [
    ("cut", "truncated ({size} bytes, index needs {need}); rebuild with `spactor preprocess`"),
    ("grown", "{size} bytes, but its index other.idx describes {need}: the two files are not from the same "
              "`spactor preprocess` run; rebuild both with `spactor preprocess`"),
])
def test_a_bin_that_does_not_match_its_index(preset, capsys, tmp_path, damage, message):
    prefix = tmp_path / "other"
    shutil.copy(f"{preset[1]}.idx", f"{prefix}.idx")
    data = Path(f"{preset[1]}.bin").read_bytes()
    damaged = data[: len(data) // 2] if damage == "cut" else data + data[:64]  # the .bin of a larger dataset
    Path(f"{prefix}.bin").write_bytes(damaged)
    line = refused(capsys, "train", "--config", str(preset[0]), "--data.train_data", str(prefix))
    assert line == f"spactor train: error: {prefix}.bin: " + message.format(size=len(damaged), need=len(data))


def test_a_dataset_too_small_for_the_requested_steps(preset, capsys):
    line = refused(capsys, "train", "--config", str(preset[0]), "--train.steps", "5000")
    assert line.startswith(f"spactor train: error: {preset[1]}: the run needs 40000 samples of its train split, "
                           "which holds ")
    assert line.endswith("add data, lower train.steps or train.global_batch_size, or raise data.max_epochs to "
                         "repeat it")


def test_a_missing_tokenizer_is_named(preset, capsys, tmp_path):
    line = refused(capsys, "train", "--config", str(preset[0]), "--data.tokenizer", str(tmp_path / "tok"),
                   "--data.train_corpus", "[]")
    assert line.startswith(f"spactor train: error: {tmp_path / 'tok'}")
    assert "not found" in line


def test_resuming_from_a_folder_that_is_no_checkpoint(preset, capsys, tmp_path):
    assert refused(capsys, "train", "--config", str(preset[0]), "--train.resume", str(tmp_path)) == (
        f"spactor train: error: {tmp_path}: not a complete checkpoint (no run.json); pick another or start afresh")


def test_an_extra_evaluation_set_that_does_not_exist_is_named(preset, capsys, tmp_path):
    assert refused(capsys, "train", "--config", str(preset[0]), "--data.eval_data", str(tmp_path / "held_out")) == (
        f"spactor train: error: {tmp_path / 'held_out.idx'}: indexed dataset file not found; "
        "build it with `spactor preprocess`")


def test_extra_evaluation_sets_named_like_a_split_are_refused(preset, capsys, tmp_path):
    line = refused(capsys, "train", "--config", str(preset[0]), "--data.eval_data", f"[{tmp_path / 'valid'}]")
    assert "each extra evaluation set is reported under its file name" in line and "data.eval_data" in line


def test_a_study_config_with_an_unknown_field_or_arm_is_named(preset, capsys, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": str(preset[0]), "taus": [4], "sedes": [1]}))
    assert refused(capsys, "study", "--config", str(study)).startswith(
        f"spactor study: error: {study}: unknown study field(s) sedes; known: ")
    study.write_text(yaml.safe_dump({"base": str(preset[0]), "taus": [4], "out_dir": str(tmp_path / "out")}))
    assert refused(capsys, "study", "--config", str(study), "--arms", "spactor-tau5") == (
        "spactor study: error: --arms: no arm spactor-tau5 in this study; its arms: sc, spactor-tau4, spactor-inf")


def test_bad_input_table_lists_twenty_classes_each_with_a_test():
    """The docs' table (docs/bad-input.md): at least 20 rows, and every test it names exists."""
    table = (ROOT / "docs" / "bad-input.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| class")]
    assert len(rows) >= 20
    for row in rows:
        test = row.rstrip(" |").rsplit("|", 1)[1].strip().strip("`")
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text()
        assert f"def {name.split('[')[0]}(" in source, test
