"""Weights & Biases beside TensorBoard, offline (``WANDB_MODE=offline``, no network): the local run
holds the scalars of the metrics file under TensorBoard's names and the resolved config, a resumed
run continues the same W&B run; W&B asked for without its package is one line before anything, and
one that cannot start (no login) one line too."""

import json
import struct
import sys
from pathlib import Path

import pytest

from spactor_mega.cli import main
from spactor_mega.config import ConfigError
from spactor_mega.errors import UserError
from spactor_mega.parallel.testing import run_distributed
from spactor_mega.plan.validate import validate
from spactor_mega.training.metrics import WANDB_RUN_ID, WandbSink
from tests.training.test_training import tiny_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file. wandb 0.31 reads it in its Go core only (the Python reader,
    ``wandb.sdk.internal.datastore``, is gone), so here is its format: a 7-byte header (``:W&B``,
    magic 0xBEE1, version 0), then LevelDB's log format: 32 KiB blocks of chunks (crc32c, length,
    type: 1 full, 2 first, 3 middle, 4 last), a block's tail under 7 bytes zero-filled; each record
    a ``wandb_internal_pb2.Record``."""
    wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # the `wandb` extra (in `test`)
    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), data[:7]
    records, pending, at, block = [], b"", 7, 32768
    while at + 7 <= len(data):
        if block - at % block < 7:
            at += block - at % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, at)
        chunk = data[at + 7:at + 7 + length]
        at += 7 + length
        if kind == 0:  # zero padding at the end of the file
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(records) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of the history records."""
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            rows.setdefault(int(r.history.step.num), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def wandb_config(records) -> dict:
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        config.update({item.key: json.loads(item.value_json) for item in updates if not item.key.startswith("_")})
    return config


def _train_twice(rank, world_size, first, resumed):
    """The run stopped at its exit interval, then resumed to its last step: one launch."""
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    try:
        steps = [train(first).step]
        destroy_parallel(destroy_process_group=False)
        steps.append(train(resumed).step)
    finally:
        destroy_parallel()
    return steps


def test_an_offline_wandb_run_holds_the_scalars_and_the_config_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `wandb` extra (part of `test`)
    work = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")  # logging.wandb_mode unset: W&B's variable decides
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    common = dict(logging__wandb_project="spactor-test", logging__wandb_run_name="tiny", logging__metrics_file=
                  str(work / "metrics.jsonl"), train__steps=4, train__eval_interval=2, train__eval_batches=1)
    first = tiny_config(work, train__exit_interval=2, **common)
    resumed = tiny_config(work, train__resume="auto", **common)
    assert run_distributed(_train_twice, 1, first, resumed, timeout=600)[0] == [2, 4]

    run_id = (work / "ckpt" / WANDB_RUN_ID).read_text().strip()
    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]  # the resumed run continued it
    history = {}
    for folder, cfg in zip(runs, (first, resumed)):
        records = wandb_records(folder / f"run-{run_id}.wandb")
        run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run_record.run_id, run_record.project, run_record.display_name) == (run_id, "spactor-test", "tiny")
        assert wandb_config(records) == json.loads(json.dumps(cfg.to_dict()))  # each part's resolved config
        history.update(wandb_history(records))

    expected: dict[int, dict[str, float]] = {}
    for line in (work / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        split, step = record.pop("split"), record.pop("step")
        expected.setdefault(step, {}).update({f"{split}/{name}": value for name, value in record.items()})
    assert sorted(expected) == [0, 1, 2, 3, 4]  # valid at 0, 2, 4; train at 1..4
    assert history == expected


def test_wandb_without_its_package_is_one_line_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as where it is not installed
    cfg = tiny_config(tmp_path / "run", logging__wandb_project="spactor-test")
    with pytest.raises(ConfigError) as refused:
        validate(cfg)  # train() validates first, before any process group, data or model
    assert str(refused.value) == ("logging.wandb_project=spactor-test: the wandb package is not installed; "
                                  "pip install 'spactor_mega[wandb]' (or leave logging.wandb_project empty)")
    assert main(["train", "--config", str(DEMO_CONFIG), "--logging.wandb_project", "spactor-test", "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"spactor train: error: {refused.value}"]
    cfg.logging.wandb_mode = "disabled"  # W&B turned off: nothing to install
    validate(cfg)


def test_wandb_online_without_a_login_is_one_line(tmp_path, monkeypatch):
    """No API key (none in the environment, no ~/.netrc, no W&B settings): wandb's UsageError as one
    line naming the field and the offline mode, not its traceback."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable in ("HOME", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.setenv(variable, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = tiny_config(tmp_path / "run", logging__wandb_project="spactor-test")
    with pytest.raises(UserError, match=r"^logging.wandb_project=spactor-test: W&B did not start: .*API key.* "
                                        r"\(or log offline: --logging.wandb_mode offline, then `wandb sync`\)$"):
        WandbSink(cfg, resumed=False)
