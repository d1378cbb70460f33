"""A briefly trained SpacTor checkpoint, exported: transformers fills the sentinels of a held-out SC
example with the tokens our model predicts; imported back, `spactor train` continues from it under
TP = 2 with the validation loss the trained model had."""

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.test_training import DEMO, tiny_config


def held_out_examples(tokenizer, encoder_length, rows: int = 1):
    """``rows`` SC examples (inputs, targets, decoder length), one from each of the first demo *train*
    shard documents long enough (the runs here train on the validation shard)."""
    from spactor_mega.data.span_corruption import SpanCorruption, sample_keys

    corruption = SpanCorruption(encoder_length, tokenizer.first_sentinel_id, tokenizer.num_sentinels)
    with gzip.open(sorted(DEMO.glob("c4-train.*.json.gz"))[0], "rt", encoding="utf-8") as f:
        long_enough = (ids for ids in (tokenizer.encode(json.loads(line)["text"]) for line in f)
                       if len(ids) >= corruption.raw_length)
        raw = [next(long_enough)[: corruption.raw_length] for _ in range(rows)]
    inputs, targets = corruption(np.array(raw), sample_keys(99, np.arange(rows)))
    return torch.from_numpy(inputs), torch.from_numpy(targets), corruption.decoder_length


def test_exported_model_fills_sentinels_like_ours(trained, tmp_path):
    from transformers import T5ForConditionalGeneration

    from spactor_mega.checkpoint.megatron import load_model_weights
    from spactor_mega.convert.hf_export import export_to_hf
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
    from spactor_mega.model.decoding import greedy_decode
    from spactor_mega.model.t5 import T5Discriminator, export_vocab_size, model_vocab_size
    from spactor_mega.parallel.state import single_process_parallel

    cfg, result = trained
    checkpoint = Path(result["checkpoint"])
    tokenizer = T5SentencePieceTokenizer(cfg.data.tokenizer)
    enc, targets, decoder_length = held_out_examples(tokenizer, cfg.data.encoder_seq_length)

    with single_process_parallel():
        d = T5Discriminator(cfg.model, model_vocab_size(cfg.model, tokenizer.model_vocab_size, 1))
        load_model_weights(checkpoint, d)
        ours = greedy_decode(d.eval(), enc, None, decoder_length,
                             vocab_limit=export_vocab_size(cfg.model, tokenizer.model_vocab_size))
    hf = T5ForConditionalGeneration.from_pretrained(str(export_to_hf(checkpoint, tmp_path / "hf"))).eval()
    with torch.no_grad():
        theirs = hf.generate(input_ids=enc, max_new_tokens=decoder_length, do_sample=False, num_beams=1)
    print("input:    ", tokenizer.decode(enc[0].tolist()))
    print("targets:  ", tokenizer.decode(targets[0].tolist()))
    print("predicted:", tokenizer.decode(theirs[0].tolist()))
    assert torch.equal(theirs, ours), (theirs, ours)
    assert tokenizer.first_sentinel_id in theirs[0].tolist()  # it learned the SC target format


def _continue(rank, world_size, cfg):
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    try:
        result = train(cfg)
    finally:
        destroy_parallel()
    return {"history": result.history, "evals": result.evals}


def test_imported_checkpoint_continues_training_under_tp2(trained, tmp_path):
    from spactor_mega.checkpoint.store import read_record
    from spactor_mega.convert.hf_export import checkpoint_config, export_to_hf
    from spactor_mega.convert.hf_import import import_from_hf
    from spactor_mega.parallel.testing import run_distributed

    cfg, result = trained
    hf_dir = export_to_hf(result["checkpoint"], tmp_path / "hf")
    save_dir = import_from_hf(hf_dir, tmp_path / "imported", tp=2)
    imported_model = checkpoint_config(save_dir, read_record(save_dir / "iter_0000000")).model
    work = Path(cfg.train.save_dir).parent.parent / "continued"  # beside the trained run: same tokenizer, data
    more = tiny_config(work, train__steps=2, train__eval_interval=2, spactor__tau=0.0, train__resume=str(save_dir),
                       parallel__tensor_model_parallel_size=2)
    more.model = dataclasses.replace(imported_model)
    continued = run_distributed(_continue, 2, more, timeout=600)[0]
    # Validation before any step (SC only) = the trained run's last validation (SC only after tau).
    assert continued["evals"][0]["step"] == 0
    assert continued["evals"][0]["sc_loss"] == pytest.approx(result["evals"][-1]["sc_loss"], rel=1e-5)
    assert [h["step"] for h in continued["history"]] == [1, 2] and all(np.isfinite(h["loss"]) for h in continued["history"])
