"""A Megatron checkpoint whose Adafactor state is in the layout before commit 0fc54ae (one object per
TP/PP rank; tests/fixtures/checkpoint_adafactor_4773a7c, written by that code) is refused before
anything is built, with a line naming the format change and what to do; a checkpoint of the current
layout whose record has no ``format`` field (written the day it came) is not."""

import json
import shutil
from pathlib import Path

import pytest

from spactor_mega.checkpoint.store import (
    RUN_RECORD,
    CheckpointError,
    check_resumable,
    read_record,
)
from tests.training.test_training import run, tiny_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_adafactor_4773a7c" / "iter_0000001"


def _config(work: Path, **overrides):
    """The fixture's model (make.py there)."""
    cfg = tiny_config(work, spactor__tau=4, train__steps=2, optim__optimizer="adafactor", **overrides)
    cfg.model.num_heads, cfg.model.num_encoder_layers, cfg.model.num_decoder_layers = 2, 2, 2
    return cfg


def test_old_adafactor_layout_is_refused_naming_the_change_and_the_way_on(tmp_path):
    record = read_record(FIXTURE)
    assert "format" not in record
    with pytest.raises(CheckpointError) as refused:
        check_resumable(FIXTURE, record, _config(tmp_path / "run"), record["vocab_size"], "")
    assert str(refused.value) == (
        f"{FIXTURE}: holds Adafactor state in the layout before commit 0fc54ae (one object per TP/PP rank, now "
        "one per parameter), which this version cannot load; keep its weights and start G, the RTD head and the "
        f"optimizers afresh: spactor convert to-hf {FIXTURE} HF_DIR, then spactor convert from-hf HF_DIR "
        "NEW_SAVE_DIR --tp 1 --pp 1 and train with --train.resume NEW_SAVE_DIR (from step 0), or resume it with "
        "the code of commit 4773a7c")


def test_current_adafactor_layout_without_a_format_field_resumes(tmp_path):
    cfg = _config(tmp_path / "run", train__exit_interval=1, train__resume="auto")
    checkpoint = Path(run(cfg)["checkpoint"])
    record = read_record(checkpoint)
    assert record["format"] == 2
    del record["format"]  # as the records of the day the layout came
    (checkpoint / RUN_RECORD).write_text(json.dumps(record))
    check_resumable(checkpoint, record, cfg, record["vocab_size"], "")
    # and the run resumes from it (its Adafactor state loads)
    assert [h["step"] for h in run(cfg)["history"]] == [2]


def test_weights_of_the_old_layout_convert_for_a_fresh_start(tmp_path):
    """The way on the refusal names: the weights export (they are read by name, not with the optimizer)."""
    from spactor_mega.convert.hf_export import export_to_hf

    shutil.copytree(FIXTURE.parent, tmp_path / "old")
    assert (export_to_hf(tmp_path / "old", tmp_path / "hf") / "config.json").is_file()
