"""`spactor convert`: checkpoints of every layout export exactly to HF T5; HF T5 v1.1 imports exactly,
loads and trains under the TP/PP asked for; bad input gets one-line refusals."""

import json
import logging
import zlib
from pathlib import Path

import pytest
import torch

from spactor_mega.parallel.testing import run_distributed

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # (TP, PP); 2 processes each (TP=1 is DP=2)
GREEDY_TOKENS = 12



def _objective(cfg, tok):
    from spactor_mega.model.spactor import SpactorObjective

    return SpactorObjective.from_config(cfg, mask_id=tok.mask_id, sample_vocab_size=tok.sp_size)

def _cfg(spm, tp=1, pp=1):
    from spactor_mega.model.synthetic import tiny_config

    cfg = tiny_config(tau=10.0)  # d_model 32, 2 heads of 8, d_ff 64, 2 + 2 layers; hybrid stage
    cfg.model.make_vocab_size_divisible_by = 8
    cfg.data.tokenizer = str(spm)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    return cfg


def _batch(sp_size):
    from spactor_mega.model.synthetic import synthetic_batch

    return synthetic_batch(3, 20, 7, sp_size=sp_size, seed=11, pad_rows=1, with_mlm=False)  # one padded row


@torch.no_grad()
def _perturb_norms(d):
    """RMSNorm weights off 1.0 (a swapped norm would show), the same for a layer in any layout."""
    for name, p in d.named_parameters():
        if "layernorm" in name:
            g = torch.Generator().manual_seed(zlib.crc32(d.global_parameter_name(name).encode()))
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))


def _worker(rank, world_size, work, spm, imported):
    """For each layout: a random SpacTor model (D, G, RTD head) saved by the engine, our outputs and
    greedy decoding on a fixed batch (PP = 1 layouts); then the imported HF model loaded from its
    weights-only checkpoint under that layout and trained for two steps."""
    from spactor_mega.checkpoint.megatron import load_model_weights, save_checkpoint
    from spactor_mega.checkpoint.store import make_record, read_record
    from spactor_mega.convert.hf_export import checkpoint_config
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
    from spactor_mega.model.decoding import greedy_decode
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.model.t5 import model_vocab_size
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.parallel.tensor_shards import gather_tp_tensor
    from spactor_mega.curriculum import Phase
    from spactor_mega.training.engines import build_engine

    tok = T5SentencePieceTokenizer(spm)
    batch = _batch(tok.sp_size)
    imported = Path(imported) / "iter_0000000"
    out = {}
    for name, (tp, pp) in LAYOUTS.items():
        initialize_parallel(tp, pp, seed=5)
        cfg = _cfg(spm, tp, pp)
        vocab = model_vocab_size(cfg.model, tok.model_vocab_size, tp)
        d, g, rtd = build_spactor_modules(cfg, vocab)
        _perturb_norms(d)
        engine = build_engine(cfg, d, g, rtd, _objective(cfg, tok), False)
        save_checkpoint(Path(work) / name, 3, engine.sharded_state_dict(), make_record(cfg, 3, vocab), tok.model_file)
        if pp == 1:
            d.eval()
            with torch.no_grad():
                o = d(batch["enc_tokens"], batch["dec_input"], batch["enc_mask"])
                logits = gather_tp_tensor(o.lm_logits, dim=-1)
            greedy = greedy_decode(d, batch["enc_tokens"], batch["enc_mask"], GREEDY_TOKENS)
            out[name] = {"encoder": o.encoder_hidden.transpose(0, 1).clone(), "logits": logits.transpose(0, 1).clone(),
                         "greedy": greedy, "rtd_head": {k: v.clone() for k, v in rtd.state_dict().items()}}

        # The imported model (SC only: no G) under this layout: its first loss is HF's loss.
        icfg = checkpoint_config(imported, read_record(imported))
        icfg.spactor.tau = 0.0
        icfg.parallel.tensor_model_parallel_size, icfg.parallel.pipeline_model_parallel_size = tp, pp
        ivocab = model_vocab_size(icfg.model, tok.model_vocab_size, tp)
        di, _, _ = build_spactor_modules(icfg, ivocab)
        load_model_weights(imported, di)
        iengine = build_engine(icfg, di, None, None, _objective(icfg, tok), False)
        losses = [iengine.train_step([batch], Phase.SC_ONLY)["loss"] for _ in range(3)]
        out[f"imported_{name}"] = losses
    destroy_parallel()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_spm, random_hf_t5):
    from spactor_mega.convert.hf_export import export_to_hf
    from spactor_mega.convert.hf_import import import_from_hf

    work = tmp_path_factory.mktemp("convert")
    hf_dir = random_hf_t5
    import_from_hf(hf_dir, work / "imported", tp=2, pp=1)
    ours = run_distributed(_worker, 2, str(work), str(tiny_spm), str(work / "imported"), timeout=900)[0]
    exports = {name: export_to_hf(work / name, work / f"hf_{name}", with_rtd_head=name == "tp2") for name in LAYOUTS}
    return {"work": work, "hf_random": hf_dir, "ours": ours, "exports": exports, "spm": tiny_spm}


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs scale {scale}"


def _load_hf(folder):
    """The HF model, failing on any warning about missing, unexpected or newly initialised weights."""
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model, info = T5ForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    bad = [m for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "newly initialized", "not used"))]
    assert not bad, bad
    return model.eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_equals_our_model_and_greedy_decoding(converted, layout):
    """Encoder states and logits within 1e-5 (fp32), greedy generate() = our greedy decoding; PP = 2
    is compared with the PP = 1 model built from the same seed (the same weights)."""
    ref = converted["ours"][layout if layout != "pp2" else "tp1"]
    hf = _load_hf(converted["exports"][layout])
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

    b = _batch(T5SentencePieceTokenizer(converted["spm"]).sp_size)
    with torch.no_grad():
        out = hf(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(), decoder_input_ids=b["dec_input"])
        generated = hf.generate(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(),
                                max_new_tokens=GREEDY_TOKENS, do_sample=False, num_beams=1)
    _close(out.encoder_last_hidden_state, ref["encoder"])
    _close(out.logits, ref["logits"][..., : out.logits.shape[-1]])
    assert torch.equal(generated, ref["greedy"]), (generated, ref["greedy"])


def test_export_folder_tokenizer_config_and_rtd_head(converted):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig

    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

    folder = converted["exports"]["tp2"]
    doc = json.loads((folder / "config.json").read_text())
    assert doc["feed_forward_proj"] == "gated-gelu" and doc["tie_word_embeddings"] is False
    ours = T5SentencePieceTokenizer(converted["spm"])
    rows = -(-ours.model_vocab_size // 8) * 8  # pieces + sentinels + mask, padded to 8 as at TP = 1
    assert (doc["d_model"], doc["d_ff"], doc["num_layers"], doc["num_decoder_layers"], doc["vocab_size"]) == (32, 64, 2, 2, rows)
    assert (doc["relative_attention_num_buckets"], doc["relative_attention_max_distance"]) == (32, 128)
    gen = GenerationConfig.from_pretrained(folder)
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 0)

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    text = "The committee built <extra_id_0> bridge <extra_id_1> yesterday."
    assert hf_tok(text).input_ids == ours.encode(text, add_eos=True)
    assert hf_tok.convert_tokens_to_ids("<extra_id_99>") == ours.sentinel_id(99)

    head = load_file(str(folder / "rtd_head.safetensors"))
    live = converted["ours"]["tp2"]["rtd_head"]
    assert set(head) == set(live) and all(torch.equal(head[k], live[k]) for k in live)
    assert not any("generator" in p.name or "rtd" in p.name for p in (converted["exports"]["tp1"]).iterdir())


def test_bf16_export_is_the_fp32_export_rounded(converted, tmp_path):
    from safetensors.torch import load_file

    from spactor_mega.convert.hf_export import export_to_hf

    out = export_to_hf(converted["work"] / "tp1", tmp_path / "bf16", dtype="bf16")
    fp32 = load_file(str(converted["exports"]["tp1"] / "model.safetensors"))
    bf16 = load_file(str(out / "model.safetensors"))
    assert set(fp32) == set(bf16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _hf_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_from_hf_to_hf_round_trip_is_bitwise(converted, tmp_path):
    from spactor_mega.convert.hf_export import export_to_hf

    # Small shards on the way back: the sharded index is part of what must load.
    out = export_to_hf(converted["work"] / "imported", tmp_path / "back", max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    original, back = _hf_tensors(converted["hf_random"]), _hf_tensors(out)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    _load_hf(out)


def test_imported_model_loads_and_trains_under_each_layout(converted):
    """Weights-only checkpoint (written for TP = 2) under TP = 1 (DP = 2), TP = 2 and PP = 2: the first
    loss is HF's own loss on the batch, and training lowers it."""
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

    hf = _load_hf(converted["hf_random"])
    b = _batch(T5SentencePieceTokenizer(converted["spm"]).sp_size)
    labels = b["labels"].masked_fill(b["dec_loss_mask"] == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(), labels=labels).loss.item()
    for layout in LAYOUTS:
        losses = converted["ours"][f"imported_{layout}"]
        assert losses[0] == pytest.approx(ref, rel=1e-5), (layout, losses, ref)
        assert losses[-1] < losses[0], (layout, losses)
    record = json.loads((converted["work"] / "imported" / "iter_0000000" / "run.json").read_text())
    assert record["weights_only"] and record["tensor_model_parallel_size"] == 2
    assert record["config"]["model"]["vocab_size"] == json.loads((converted["hf_random"] / "config.json").read_text())["vocab_size"]
