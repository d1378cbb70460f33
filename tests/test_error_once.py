"""Under a launcher every rank runs ``spactor``: an error every rank raises alike (config, data,
checkpoint refusals) is printed once, by rank 0; one that may be a single rank's is printed by each
rank that has it, naming the rank; every rank exits with 2."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spactor_mega.cli import _print_error
from spactor_mega.data.prepare import ensure_data
from spactor_mega.data.validation import DataError
from spactor_mega.errors import UserError
from spactor_mega.parallel.state import free_port
from tests.training.test_training import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_data_error_of_a_two_process_launch_is_printed_once(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    ensure_data(cfg)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    blend = f"[0.5, {cfg.data.train_data[0]}, 0.5, {tmp_path / 'c4_typo'}]"  # raised by every rank's dataset build
    # torchrun's environment for each of its two processes
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ranks = [subprocess.Popen([sys.executable, "-m", "spactor_mega.cli", "train", "--config", str(preset),
                               "--data.train_data", blend], cwd=ROOT, env={**env, "RANK": r, "LOCAL_RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ("0", "1")]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    message = (f"spactor train: error: {tmp_path / 'c4_typo.idx'}: indexed dataset file not found; "
               "build it with `spactor preprocess`")
    assert "".join(outputs).count(": error: ") == 1, outputs
    assert message in outputs[0].splitlines(), outputs


@pytest.mark.parametrize("rank, error, printed", [
    (None, UserError("x: bad"), "spactor train: error: x: bad"),
    (None, DataError("x: bad"), "spactor train: error: x: bad"),
    ("0", DataError("x: bad"), "spactor train: error: x: bad"),
    ("1", DataError("x: bad"), ""),
    ("0", UserError("x: bad"), "spactor train: error: [rank 0] x: bad"),
    ("1", UserError("x: bad"), "spactor train: error: [rank 1] x: bad"),
])
def test_which_rank_prints_which_error(monkeypatch, capsys, rank, error, printed):
    """A one-rank error (a plain UserError) names its rank; an every-rank one (DataError) is rank 0's."""
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    _print_error("train", error)
    assert capsys.readouterr().err.strip() == printed
