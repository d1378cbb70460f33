"""The count of skipped (non-finite) steps travels in the checkpoint: a resumed run continues it.

One process (Megatron engine): a NaN loss at step 2 (``SPACTOR_TEST_NAN_AT_STEP``), the run stops
and saves after it (``train.exit_interval``), and is resumed for step 3 without the NaN."""

from spactor_mega.checkpoint.store import read_record, recorded_skipped_steps
from spactor_mega.training.nonfinite import TEST_NAN_STEPS_ENV
from tests.training.test_training import run, tiny_config


def test_a_resumed_run_continues_the_skipped_step_count(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", train__steps=3, train__exit_interval=2, train__resume="auto")
    monkeypatch.setenv(TEST_NAN_STEPS_ENV, "2")  # read by the spawned worker
    first = run(cfg)
    assert [h["skipped_steps"] for h in first["history"]] == [0.0, 1.0]
    record = read_record(first["checkpoint"])
    assert (record["skipped_steps"], record["skipped_in_a_row"]) == (1, 1)

    monkeypatch.delenv(TEST_NAN_STEPS_ENV)
    resumed = run(cfg)
    assert [(h["step"], h["skipped"], h["skipped_steps"]) for h in resumed["history"]] == [(3, 0.0, 1.0)]
    assert recorded_skipped_steps(read_record(resumed["checkpoint"])) == (1, 0)


def test_records_from_before_the_count_read_as_none_skipped():
    assert recorded_skipped_steps({"step": 5, "consumed_samples": 40}) == (0, 0)
