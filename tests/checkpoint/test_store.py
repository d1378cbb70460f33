"""The checkpoint store's resumability checks, on records alone (nothing is built)."""

from pathlib import Path

import pytest

from spactor_mega.checkpoint.store import CheckpointError, check_resumable, make_record
from spactor_mega.model.synthetic import tiny_config


def test_a_checkpoint_of_the_other_precision_is_refused_naming_the_field():
    cfg = tiny_config()
    cfg.train.precision = "bf16"
    record = make_record(cfg, 3, 256)
    assert record["precision"] == "bf16"
    check_resumable(Path("ckpt"), record, cfg, 256, "")  # same precision: fine
    cfg.train.precision = "fp32"
    with pytest.raises(CheckpointError, match=r"written by a bf16 run but this run trains in fp32; "
                                              r"resume with train\.precision=bf16"):
        check_resumable(Path("ckpt"), record, cfg, 256, "")
    del record["precision"]  # a record from before the field: not checked
    check_resumable(Path("ckpt"), record, cfg, 256, "")
