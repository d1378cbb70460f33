"""Every public T5 family in and out exactly: T5 v1.0 (ReLU, tied head), T5 v1.1 / Flan-T5, mT5,
UMT5 (a bias table per layer) and a UL2-style gated-SiLU T5, each a small random HF folder
(tests/hf_families.py). Imported for TP = 1 and for TP = 2 x PP = 2: our encoder states and logits
equal HF's (under PP through Megatron's pipeline schedule), our loss equals HF's and training follows the TP = 1 run step for step
(TP = 2 x PP = 2, where a tied head's copy on the last stage is summed with the embedding);
exported back, every tensor is bitwise the original's and the config loads into the same class."""

import json
from pathlib import Path

import pytest
import torch

from spactor_mega.parallel.testing import run_distributed
from tests.hf_families import FAMILIES

LAYOUTS = {"tp1": (1, 1), "tp2pp2": (2, 2)}  # 4 processes: DP 4 and DP 1
STEPS = 3
# config.json fields that define the model (and its ids): equal after a round trip
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                 "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                 "feed_forward_proj", "is_gated_act", "dense_act_fn", "decoder_start_token_id", "pad_token_id",
                 "eos_token_id")


def _batch(sp_size):
    from spactor_mega.model.synthetic import synthetic_batch

    return synthetic_batch(4, 20, 7, sp_size=sp_size, seed=11, pad_rows=1, with_mlm=False)  # one padded row


def _pipeline_outputs(chunks, batch) -> list:
    """A forward-only pass of Megatron's pipeline schedule over D's stages; on the last stage the
    encoder states and the full-vocabulary logits (TP-gathered), batch-first; elsewhere []."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from spactor_mega.parallel.tensor_shards import gather_tp_tensor

    s_dec = batch["dec_input"].size(1)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model.stage_forward(b["enc_tokens"] if model.pre_process else None, b["dec_input"], b["enc_mask"])

        def outputs(output):
            encoder, decoder = output
            logits = gather_tp_tensor(model.lm_logits(decoder)[:s_dec], dim=-1)
            return decoder.new_zeros(()), {"encoder": encoder.transpose(0, 1).clone(), "logits": logits.transpose(0, 1).clone()}

        return out, outputs

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
            seq_length=chunks[0].packed_length(batch["enc_tokens"].size(1), s_dec),
            micro_batch_size=batch["enc_tokens"].size(0), forward_only=True)


def _worker(rank, world_size, imported: dict):
    """For each family and layout: the imported model's outputs (TP = 1) and its first STEPS losses."""
    from spactor_mega.checkpoint.megatron import load_model_weights
    from spactor_mega.checkpoint.store import read_record
    from spactor_mega.convert.hf_export import checkpoint_config
    from spactor_mega.curriculum import Phase
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import as_chunks, build_spactor_modules
    from spactor_mega.model.t5 import model_vocab_size
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel
    from spactor_mega.training.engines import build_engine

    out = {}
    for family, folders in imported.items():
        for layout, (tp, pp) in LAYOUTS.items():
            checkpoint = Path(folders[layout]) / "iter_0000000"
            initialize_parallel(tp, pp, seed=5)
            cfg = checkpoint_config(checkpoint, read_record(checkpoint))
            cfg.spactor.tau = 0.0
            cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1  # steps that change the loss visibly
            tok = T5SentencePieceTokenizer(checkpoint)
            batch = _batch(tok.sp_size)
            d, _, _ = build_spactor_modules(cfg, model_vocab_size(cfg.model, tok.model_vocab_size, tp))
            for chunk in as_chunks(d):
                load_model_weights(checkpoint, chunk)
            for chunk in as_chunks(d):
                chunk.eval()
            if pp == 1:
                if rank == 0:
                    with torch.no_grad():
                        o = d(batch["enc_tokens"], batch["dec_input"], batch["enc_mask"])
                    out[f"{family}/{layout}/outputs"] = {"encoder": o.encoder_hidden.transpose(0, 1).clone(),
                                                         "logits": o.lm_logits.transpose(0, 1).clone()}
            else:
                found = _pipeline_outputs(as_chunks(d), batch)
                if found and rank == world_size - 1:  # the last stage's TP rank 1
                    out[f"{family}/{layout}/outputs"] = found[0]
            for chunk in as_chunks(d):
                chunk.train()
            objective = SpactorObjective.from_config(cfg, mask_id=tok.mask_id, sample_vocab_size=tok.sp_size)
            engine = build_engine(cfg, d, None, None, objective, False)
            out[f"{family}/{layout}"] = [engine.train_step([batch], Phase.SC_ONLY)["loss"] for _ in range(STEPS)]
            del engine, d
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory, hf_family):
    from spactor_mega.convert.hf_import import import_from_hf

    work = tmp_path_factory.mktemp("families")
    hf_family_dirs = {family: hf_family(family) for family in FAMILIES}
    imported = {family: {layout: str(import_from_hf(hf_family_dirs[family], work / family / layout, tp=tp, pp=pp))
                         for layout, (tp, pp) in LAYOUTS.items()} for family in FAMILIES}
    ours = {k: v for rank in run_distributed(_worker, 4, imported, timeout=1200) for k, v in rank.items()}
    return {"work": work, "imported": imported, "ours": ours, "hf": hf_family_dirs}


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs scale {scale}"


def _hf_model(folder: Path):
    from spactor_mega.model.hf_mapping import hf_classes

    _, model_class = hf_classes(json.loads((folder / "config.json").read_text())["model_type"])
    model, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_computes_what_hf_computes(families, family):
    """TP = 1 and TP = 2 x PP = 2: encoder states and logits within 1e-5 of HF's, the first loss
    HF's loss on the batch (rel 1e-5), and the next steps agree between the layouts (rel 1e-5)."""
    from spactor_mega.data.tokenizer import T5SentencePieceTokenizer

    hf = _hf_model(families["hf"][family])
    b = _batch(T5SentencePieceTokenizer(families["hf"][family]).sp_size)
    labels = b["labels"].masked_fill(b["dec_loss_mask"] == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(), decoder_input_ids=b["dec_input"])
        loss = hf(input_ids=b["enc_tokens"], attention_mask=b["enc_mask"].long(), labels=labels).loss.item()
    ours = families["ours"]
    for layout in LAYOUTS:
        _close(ours[f"{family}/{layout}/outputs"]["encoder"], ref.encoder_last_hidden_state)
        _close(ours[f"{family}/{layout}/outputs"]["logits"][..., : ref.logits.shape[-1]], ref.logits)
    tp1, tp2pp2 = ours[f"{family}/tp1"], ours[f"{family}/tp2pp2"]
    assert tp1[0] == pytest.approx(loss, rel=1e-5) and tp2pp2[0] == pytest.approx(loss, rel=1e-5), (tp1, tp2pp2, loss)
    assert tp2pp2 == pytest.approx(tp1, rel=1e-5) and tp1[-1] < tp1[0], (tp1, tp2pp2)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_the_same_tensors_and_config(families, family, tmp_path):
    from spactor_mega.convert.hf_export import export_to_hf

    original = families["hf"][family]
    back = export_to_hf(families["imported"][family]["tp2pp2"], tmp_path / "back")
    theirs, ours = _tensors(original), _tensors(back)
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    a, b = (json.loads((f / "config.json").read_text()) for f in (original, back))
    assert {k: b.get(k) for k in CONFIG_FIELDS} == {k: a.get(k) for k in CONFIG_FIELDS}
    loaded, reference = _hf_model(back), _hf_model(original)
    assert type(loaded) is type(reference)
    for what in ("tie_word_embeddings", "scale_decoder_outputs"):  # the head's layout as transformers reads it
        assert getattr(loaded.config, what, None) == getattr(reference.config, what, None), what
    assert (loaded.lm_head.weight.data_ptr() == loaded.shared.weight.data_ptr()) == FAMILIES[family].tied
