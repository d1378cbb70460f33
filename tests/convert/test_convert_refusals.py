"""`spactor convert` refuses what it cannot convert with one line naming the file and the fix, and
leaves no partial output behind."""

import json
import shutil

import pytest

from spactor_mega.checkpoint.store import CheckpointError, check_resumable, read_record
from spactor_mega.convert.hf_export import export_to_hf
from spactor_mega.convert.hf_import import ImportRefused, import_from_hf
from spactor_mega.errors import OutputExistsError


@pytest.fixture(scope="module")
def imported(tmp_path_factory, random_hf_t5):
    return import_from_hf(random_hf_t5, tmp_path_factory.mktemp("refusals") / "ckpt")


def _edited_hf(src, dst, **changes):
    shutil.copytree(src, dst)
    doc = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (dst / "config.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"feed_forward_proj": "gelu"}, r"feed_forward_proj 'gelu'; the feed-forwards that can be imported are relu, "),
    # a v1.1 folder (two head tensors) whose config asks for v1.0's rescale
    ({"tie_word_embeddings": True, "scale_decoder_outputs": None}, "an untied LM head with the decoder-output rescale"),
    ({"model_type": "bart"}, "model_type 'bart' is not of the T5 family"),
    ({"architectures": ["T5EncoderModel"]}, "has no T5ForConditionalGeneration"),
])
def test_from_hf_refuses_what_it_cannot_train(random_hf_t5, tmp_path, changes, message):
    source = _edited_hf(random_hf_t5, tmp_path / "hf", **changes)
    with pytest.raises(ImportRefused, match=message):
        import_from_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_from_hf_refuses_a_folder_without_config_or_tokenizer(random_hf_t5, tmp_path):
    with pytest.raises(ImportRefused, match="no config.json"):
        import_from_hf(tmp_path, tmp_path / "out")
    source = shutil.copytree(random_hf_t5, tmp_path / "hf")
    (source / "spiece.model").unlink()
    with pytest.raises(ImportRefused, match="no spiece.model"):
        import_from_hf(source, tmp_path / "out")


def test_existing_output_needs_force(imported, random_hf_t5, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        export_to_hf(imported, out)
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        import_from_hf(random_hf_t5, out)
    assert (out / "keep").exists()
    export_to_hf(imported, out, force=True)
    assert not (out / "keep").exists() and (out / "config.json").is_file()


def test_checkpoint_not_matching_its_config_is_refused(imported, tmp_path):
    ckpt = shutil.copytree(imported / "iter_0000000", tmp_path / "iter_0000000")
    record = read_record(ckpt)
    record["config"]["model"]["d_ff"] = 96
    (ckpt / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"mlp.linear_fc1.weight has shape \[96, 32\] but run.json's model config "
                                              r"needs \[192, 32\]; the checkpoint does not match its run.json"):
        export_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_an_engine_without_a_reader_is_refused(imported, tmp_path):
    ckpt = shutil.copytree(imported / "iter_0000000", tmp_path / "iter_0000000")
    record = read_record(ckpt)
    record["config"]["train"]["engine"] = "fsdp"
    (ckpt / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"run.json: written by train.engine='fsdp', which has no checkpoint reader"):
        export_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_checkpoint_of_another_architecture(imported):
    from spactor_mega.config import Config

    cfg = Config()  # the default model (d_model 512), not the imported one (32)
    record = read_record(imported / "iter_0000000")
    with pytest.raises(CheckpointError, match=r"written for model.d_model=32 but this run has model.d_model=512; "
                                              r"resume with the checkpoint's model config"):
        check_resumable(imported / "iter_0000000", record, cfg, record["vocab_size"], "E2|D2")


def test_rtd_head_export_needs_a_checkpoint_that_has_one(imported, tmp_path):
    with pytest.raises(CheckpointError, match="holds no RTD head"):
        export_to_hf(imported, tmp_path / "out", with_rtd_head=True)
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_and_exits_2(imported, tmp_path, capsys):
    from spactor_mega.cli import main

    assert main(["convert", "to-hf", str(imported), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("spactor convert: error: ") and "pass --force" in err
    assert main(["convert", "to-hf", str(imported), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert "T5ForConditionalGeneration.from_pretrained" in capsys.readouterr().out
