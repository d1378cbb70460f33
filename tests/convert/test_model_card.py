"""The model card (README.md) of an exported folder: the Hub's parser reads it, its metadata is what
the Hub expects, and its numbers are the run's own (read from the run's files, never written here)."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from spactor_mega.checkpoint.store import make_record
from spactor_mega.config import Config, ConfigError
from spactor_mega.convert.hf_export import export_to_hf
from spactor_mega.convert.model_card import model_card
from spactor_mega.curriculum import AutoTau
from spactor_mega.model.hf_mapping import hf_classes, hf_config, untie_lm_head
from spactor_mega.plan.validate import validate


def hf_parameter_count(model_cfg, vocab_rows: int) -> int:
    """Parameters of transformers' own model of this kind (built on the meta device; tied ones once;
    transformers 5.x ties every T5-family head at construction, so an untied one is untied here)."""
    with torch.device("meta"):
        model = hf_classes(model_cfg.hf_model_type)[1](hf_config(model_cfg, vocab_rows))
        if not model_cfg.tie_word_embeddings:
            untie_lm_head(model)
    return sum(p.numel() for p in model.parameters())


def usage_snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_card_of_a_trained_export_holds_the_runs_numbers(trained, tmp_path):
    cfg, result = trained
    checkpoint = Path(result["checkpoint"])
    folder = export_to_hf(checkpoint, tmp_path / "hf")
    card = ModelCard.load(folder / "README.md")
    meta, text = card.data.to_dict(), card.text

    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text2text-generation"
    assert meta["license"] == "apache-2.0"  # model.license's default
    assert {"t5", "t5-v1_1", "spactor"} <= set(meta["tags"])
    assert meta["datasets"] == ["allenai/c4"]  # the demo corpus: C4's own shard files

    # The run's files: the checkpoint's run.json and the metrics file's last evaluation
    record = json.loads((checkpoint / "run.json").read_text())
    run = record["config"]
    steps, samples = record["step"], record["consumed_samples"]
    assert steps == run["train"]["steps"] and samples == steps * run["train"]["global_batch_size"]
    assert f"| steps | {steps:,} optimizer steps" in text
    assert f"| tokens seen | {samples * run['data']['encoder_seq_length']:,}: " in text
    assert f"| tau | {float(run['spactor']['tau']):g} (fixed) |" in text
    s = run["spactor"]
    assert f"SC + {s['mlm_weight']:g} * MLM + {s['rtd_weight']:g} * RTD" in text
    model = hf_classes("t5")[1].from_pretrained(str(folder))
    assert f"| D, the encoder-decoder | {sum(p.numel() for p in model.parameters()):,} | yes" in text
    assert "| layout | TP 1 x PP 1 x DP 1 = 1 rank |" in text
    assert f"| precision | trained in {record['precision']}; this folder's weights are fp32 |" in text

    evaluations = [json.loads(line) for line in Path(run["logging"]["metrics_file"]).read_text().splitlines()]
    last = [e for e in evaluations if e["split"] == "valid"][-1]
    assert last["step"] == steps
    metrics = {k: v for k, v in last.items() if k not in ("split", "step")}
    assert "sc_loss" in metrics
    for name, value in metrics.items():
        assert f"| valid | {name} | {value:.4f} |" in text, name

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(usage_snippet(text), {})  # the card's own loading snippet, on the folder it describes
    assert printed.getvalue().startswith("<pad>")  # the decoder starts from pad, as HF's T5 does


def _auto_tau_run() -> tuple[Config, dict]:
    """An mT5-kind config with tau auto, a blend and no corpus, and a record of step 700 whose
    signal decided tau at step 600."""
    cfg = Config()
    m = cfg.model
    m.hf_model_type, m.d_model, m.d_kv, m.d_ff, m.num_heads = "mt5", 64, 16, 96, 4
    m.num_encoder_layers, m.num_decoder_layers, m.license = 3, 2, "mit"
    cfg.data.train_data = [3, "data/web", 1, "data/code"]
    cfg.data.encoder_seq_length = 128
    cfg.spactor.tau = "auto"
    cfg.spactor.rtd_weight, cfg.spactor.mlm_weight, cfg.spactor.z_loss = 20.0, 0.5, 1e-4
    a = cfg.spactor.auto_tau
    a.interval, a.min_steps, a.patience, a.threshold = 100, 200, 2, 0.5
    auto = AutoTau.from_config(a)
    for step, gain in ((100, 1.0), (200, 0.8), (300, 0.6), (400, 0.7), (500, 0.4), (600, 0.3)):
        auto.observe(step, gain)
    assert auto.decided == 600
    cfg.train.global_batch_size = 32
    record = make_record(cfg, 700, 256, auto.tau, data_parallel_size=2, auto_tau=auto.state(),
                         validation={"step": 700, "valid": {"sc_loss": 3.14159, "sc_accuracy": 0.4242},
                                     "code_eval": {"sc_loss": 4.5}})
    return cfg, record


def test_card_of_a_config_states_what_it_was():
    cfg, record = _auto_tau_run()
    text = model_card(cfg, record, 256, "out/mt5-spactor", dtype="bf16")
    card = ModelCard(text)
    assert card.data.license == "mit"
    assert card.data.datasets is None  # no corpus named: no dataset guessed
    assert {"t5", "mt5", "spactor"} <= set(card.data.tags)
    assert "| tau | 600, decided by auto (signal rtd_gain, threshold 0.5, patience 2" in card.text
    assert "| steps | 700 optimizer steps (600 hybrid, 100 SC only) |" in card.text
    assert f"| tokens seen | {700 * 32 * 128:,}: " in card.text
    assert "SC + 0.5 * MLM + 20 * RTD + 0.0001 * log(Z)^2 (z-loss)" in card.text
    assert "`data/web` (75.0%), `data/code` (25.0%)" in card.text
    assert f"| D, the encoder-decoder | {hf_parameter_count(cfg.model, 256):,} | yes" in card.text
    assert "| valid | sc_loss | 3.1416 |" in card.text and "| code_eval | sc_loss | 4.5000 |" in card.text
    assert "| layout | TP 1 x PP 1 x DP 2 = 2 ranks |" in card.text
    assert 'MT5ForConditionalGeneration.from_pretrained("out/mt5-spactor")' in usage_snippet(card.text)


def test_card_names_c4_only_from_its_shard_files():
    cfg, record = _auto_tau_run()
    cfg.data.train_corpus = ["/data/c4/en/c4-train.*-of-01024.json.gz"]
    assert ModelCard(model_card(cfg, record, 256, "x")).data.datasets == ["allenai/c4"]
    cfg.data.train_corpus = ["/data/c4/en/c4-train.*-of-01024.json.gz", "/data/code/*.json.gz"]
    assert ModelCard(model_card(cfg, record, 256, "x")).data.datasets is None


def test_an_undecided_auto_tau_and_a_plain_t5_run_say_so():
    cfg, record = _auto_tau_run()
    record["auto_tau"]["decided"] = None
    assert "not decided by step 700: hybrid up to here" in model_card(cfg, record, 256, "x")
    assert "| steps | 700 optimizer steps (700 hybrid, 0 SC only) |" in model_card(cfg, record, 256, "x")
    cfg.spactor.tau = 0
    cfg.train.engine = "deepspeed"
    text = model_card(cfg, record, 256, "x")
    assert "| tau | 0 (fixed): plain T5 span corruption throughout" in text
    assert "| engine | deepspeed (ZeRO stage 2, optimizer offload none) |" in text


@pytest.mark.parametrize("license_id", ["Apache 2.0", "", "MIT"])
def test_a_license_that_is_no_hub_id_is_refused_in_one_line(license_id):
    cfg = Config()
    cfg.model.license = license_id
    with pytest.raises(ConfigError, match=r"^model\.license must be a Hub license id [^\n]*$"):
        validate(cfg)


def test_an_imported_model_exported_again_says_it_was_not_trained_here():
    cfg, _ = _auto_tau_run()
    record = make_record(cfg, 0, 256, weights_only=True, imported_from="/models/mt5-small")
    text = ModelCard(model_card(cfg, record, 256, "x")).text
    assert "imported from `/models/mt5-small` by `spactor convert from-hf` and exported unchanged" in text
    assert "pretrained with SpacTor" not in text
