"""The model card of an exported folder (its ``README.md``, as the Hugging Face Hub reads it), from
the run's own facts: the config and the checkpoint's record (``run.json``).

    text = model_card(cfg, record, vocab_rows=32128, folder="t5-demo-hf")

The metadata (``library_name``, ``pipeline_tag``, ``tags``, ``license`` from ``model.license``,
``datasets`` only where the corpus names itself: C4's shard names) is rendered by
``huggingface_hub``'s :class:`ModelCardData`; the body states the architecture, the parameter
counts, the objective with tau and the loss weights, steps and tokens seen, the data and its blend,
the final validation (the record's ``validation``: the run's latest evaluation, kept in every
checkpoint written after it), precision and layout, and how to load the folder. Pure: reads no file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from spactor_mega.curriculum import AutoTau
from spactor_mega.data.dataset import parse_blend
from spactor_mega.data.span_corruption import random_spans_helper
from spactor_mega.model.hf_mapping import hf_classes
from spactor_mega.plan.derived import generator_num_layers
from spactor_mega.plan.inventory import count, generator_parameter_shapes, rtd_head_parameter_shapes, t5_parameter_shapes

# allenai/c4's shard names (c4-train.00000-of-01024.json.gz), as files or globs over them: the corpus
# is C4 (the demo corpus is a slice of it). Any other corpus names no Hub dataset: none is guessed.
C4_SHARD = re.compile(r"c4-(train|validation)\.[0-9*]+(-of-[0-9*]+)?\.json(\.gz)?")


def family(model_cfg) -> tuple[str, str]:
    """(name, Hub tag) of the T5 family member ``model_cfg`` is (docs/export.md's table)."""
    if model_cfg.hf_model_type == "mt5":
        return "mT5", "mt5"
    if model_cfg.hf_model_type == "umt5":
        return "UMT5", "umt5"
    return {"relu": ("T5 v1.0", "t5-v1_0"), "gated-gelu": ("T5 v1.1", "t5-v1_1"),
            "gated-silu": ("T5 with a gated-SiLU feed-forward (UL2-style)", "t5-gated-silu")}[model_cfg.feed_forward]


def hub_datasets(data_cfg) -> list[str]:
    """The Hub datasets the training corpus is, where its file names say so (else none)."""
    corpus = [Path(str(entry)).name for entry in data_cfg.train_corpus]
    return ["allenai/c4"] if corpus and all(C4_SHARD.fullmatch(name) for name in corpus) else []


def recorded_auto_tau(cfg, record: dict) -> AutoTau:
    """``spactor.tau: auto``'s decision as the record's checkpoint left it."""
    return AutoTau.from_config(cfg.spactor.auto_tau, record.get("auto_tau"))


def tau_of_run(cfg, record: dict) -> str:
    """Where the hybrid phase ended (or ends), as the run decided it."""
    s = cfg.spactor
    if s.tau == "auto":
        a, decided = s.auto_tau, recorded_auto_tau(cfg, record).decided
        how = (f"auto (signal {a.signal}, threshold {a.threshold}, patience {a.patience}, measured every "
               f"{a.interval} steps between steps {a.min_steps} and {a.max_steps})")
        if decided is not None:
            return f"{decided}, decided by {how}"
        return f"{how}, not decided by step {int(record['step'])}: hybrid up to here, at most until step {a.max_steps}"
    tau = float(s.tau)
    if tau == 0:
        return "0 (fixed): plain T5 span corruption throughout, no generator"
    if math.isinf(tau):
        return "inf (fixed): hybrid throughout"
    return f"{tau:g} (fixed)"


def hybrid_steps(cfg, record: dict) -> int:
    """Of the record's steps, those trained in the hybrid phase (steps below tau; an undecided auto
    tau is its bound, auto_tau.max_steps)."""
    tau = recorded_auto_tau(cfg, record).tau if cfg.spactor.tau == "auto" else float(cfg.spactor.tau)
    return int(min(int(record["step"]), tau))


def _table(rows, header: tuple = ("", "")) -> str:
    """A markdown table of ``rows`` (tuples as long as ``header``)."""
    lines = [header, ("---",) * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _architecture(cfg, vocab_rows: int, class_name: str) -> str:
    m = cfg.model
    name, _ = family(m)
    head = ("tied to the token embedding (decoder output scaled by d_model**-0.5 before it)"
            if m.tie_word_embeddings else "untied (a matrix of its own, no rescale)")
    bias = "one table per layer" if m.relative_attention_per_layer else "one table per stack, shared by its layers"
    return _table([
        ("family", f"{name} (`{class_name}`, model_type `{m.hf_model_type}`)"),
        ("d_model", m.d_model), ("d_kv", m.d_kv), ("layers", f"{m.num_encoder_layers} encoder + {m.num_decoder_layers} decoder"),
        ("attention heads", m.num_heads), ("d_ff", m.d_ff), ("feed-forward", f"`{m.feed_forward}`"),
        ("LM head", head),
        ("relative position bias", f"{m.relative_attention_num_buckets} buckets, max distance "
                                   f"{m.relative_attention_max_distance}, {bias}"),
        ("vocabulary", f"{vocab_rows:,} rows (embedding and LM head)"),
        ("dropout", m.dropout),
    ])


def _parameters(cfg, vocab_rows: int, with_rtd_head: bool) -> str:
    d = count(t5_parameter_shapes(cfg.model, vocab_rows))
    g = count(generator_parameter_shapes(cfg))
    head = count(rtd_head_parameter_shapes(cfg.model.d_model))
    return _table([
        ("D, the encoder-decoder", f"{d:,}", "yes (the model)"),
        (f"G, the generator ({_plural(generator_num_layers(cfg), 'encoder layer')}; its embedding and MLM head are D's)",
         f"{g:,}", "no: pretraining only"),
        ("RTD head (dense d->d, GELU, dense d->1 on the encoder output)", f"{head:,}",
         "yes: `rtd_head.safetensors`" if with_rtd_head else "no: pretraining only"),
    ], header=("part", "parameters", "in this folder"))


def _objective(cfg, record: dict) -> str:
    s, t, step, hybrid = cfg.spactor, cfg.train, int(record["step"]), hybrid_steps(cfg, record)
    length = cfg.data.encoder_seq_length
    raw_length, decoder_length = random_spans_helper(length, s.noise_density, s.mean_noise_span_length)
    samples = int(record.get("consumed_samples", step * t.global_batch_size))
    z = f" + {s.z_loss:g} * log(Z)^2 (z-loss)" if s.z_loss else ""
    return _table([
        ("objective", "SpacTor (Ye et al., 2023): T5's span corruption (SC) with, before step tau, a generator G "
                      "filling MLM masks and D detecting the replaced tokens (RTD); SC only from tau on"),
        ("span corruption", f"noise density {s.noise_density:g}, mean span length {s.mean_noise_span_length:g}"),
        ("hybrid loss (steps < tau)", f"SC + {s.mlm_weight:g} * MLM + {s.rtd_weight:g} * RTD{z} "
                                      f"(MLM on {s.mlm_fraction:g} of the SC inputs; G's temperature {cfg.generator.temperature:g})"),
        ("loss from tau on", f"SC{z}"),
        ("tau", tau_of_run(cfg, record)),
        ("steps", f"{step:,} optimizer steps ({hybrid:,} hybrid, {step - hybrid:,} SC only)"),
        ("batch", f"{t.global_batch_size:,} sequences of {length} encoder input and {decoder_length} target tokens"),
        ("samples seen", f"{samples:,}"),
        ("tokens seen", f"{samples * length:,}: samples x {length} encoder input tokens (the corrupted text "
                        f"with its sentinels and EOS), cut from {samples * raw_length:,} text tokens "
                        f"({raw_length} per sample)"),
        ("optimizer", f"{cfg.optim.optimizer}, peak lr {cfg.optim.lr:g}, `{cfg.optim.lr_schedule}` schedule after "
                      f"{cfg.optim.warmup_steps:,} warmup steps, seed {t.seed}"),
    ])


def _blend(entries: list) -> str:
    prefixes, weights = parse_blend(entries) or ([], None)
    weights = weights or [1.0] * len(prefixes)
    total = sum(weights)
    return ", ".join(f"`{p}` ({w / total:.1%})" for p, w in zip(prefixes, weights)) or "none"


def _data(cfg, datasets: list[str]) -> str:
    d = cfg.data
    valid = (_blend(d.valid_data) if d.valid_data
             else f"held out of the training data (split train,valid,test = {d.split})")
    pairs = [("training data (indexed prefixes, blend weight)", _blend(d.train_data)), ("validation data", valid)]
    if d.eval_data:
        pairs.append(("extra evaluation sets", ", ".join(f"`{p}`" for p in d.eval_data)))
    if d.train_corpus:
        pairs.append(("built from", ", ".join(f"`{c}`" for c in d.train_corpus)))
    pairs.append(("Hub dataset", ", ".join(datasets) or "not known from the run's files"))
    return _table(pairs)


def _validation(record: dict) -> str:
    validation = record.get("validation")
    if not validation:
        return ("No evaluation was recorded (`train.eval_interval: 0`, or a checkpoint written before "
                "validations were recorded).")
    at = validation["step"]
    rows = [(name, metric, f"{float(value):.4f}") for name, metrics in validation.items() if name != "step"
            for metric, value in metrics.items()]
    return (f"The last evaluation, of the weights after step {at:,}: the held-out SC loss on clean inputs (`sc_loss`) "
            "and, while hybrid, the hybrid objective's terms.\n\n" + _table(rows, header=("set", "metric", "value")))


def _layout(cfg, record: dict, dtype: str) -> str:
    p, t = cfg.parallel, cfg.train
    tp = record.get("tensor_model_parallel_size", p.tensor_model_parallel_size)
    pp = record.get("pipeline_model_parallel_size", p.pipeline_model_parallel_size)
    dp = record.get("data_parallel_size")
    engine = t.engine + (f" (ZeRO stage {cfg.deepspeed.zero_stage}, optimizer offload {cfg.deepspeed.offload_optimizer})"
                         if t.engine == "deepspeed" else "")
    layout = f"TP {tp} x PP {pp} x DP {dp if dp is not None else 'not recorded'}"
    if dp is not None:
        layout += f" = {_plural(tp * pp * dp, 'rank')}"
    pairs = [("precision", f"trained in {record.get('precision', t.precision)}; this folder's weights are {dtype}"),
             ("engine", engine), ("layout", layout), ("micro-batch", f"{t.micro_batch_size} sequences per rank")]
    if pp > 1:
        pairs.append(("pipeline stages", f"`{record.get('pipeline_layout', p.pipeline_layout)}`"
                                         + (f", {p.virtual_pipeline_model_parallel_size} virtual stages per rank"
                                            if p.virtual_pipeline_model_parallel_size > 1 else "")))
    pairs += [("sequence parallel", p.sequence_parallel), ("distributed optimizer", p.distributed_optimizer),
              ("activation recompute", cfg.model.recompute)]
    return _table(pairs)


def _usage(folder: str, class_name: str) -> str:
    return f'''```python
from transformers import AutoTokenizer, {class_name}

tokenizer = AutoTokenizer.from_pretrained("{folder}")
model = {class_name}.from_pretrained("{folder}")
inputs = tokenizer("The <extra_id_0> walks in <extra_id_1> park.", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=20)
print(tokenizer.decode(outputs[0]))
```'''


def model_card(cfg, record: dict, vocab_rows: int, folder: str, dtype: str = "fp32", with_rtd_head: bool = False) -> str:
    """The README.md of the HF folder ``folder`` exported from the checkpoint of ``record`` (its
    ``run.json``) written by a run of ``cfg``: ``vocab_rows`` vocabulary rows, weights in ``dtype``."""
    name, tag = family(cfg.model)
    class_name = hf_classes(cfg.model.hf_model_type)[1].__name__
    datasets = hub_datasets(cfg.data)
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text2text-generation", license=cfg.model.license,
        tags=list(dict.fromkeys(["t5", cfg.model.hf_model_type, tag, "spactor", "span-corruption",
                                 "replaced-token-detection"])),
        datasets=datasets or None,
    )
    sections = [
        f"# {Path(folder).name}",
        (f"A {name} encoder-decoder imported from `{record.get('imported_from')}` by `spactor convert from-hf` "
         "and exported unchanged: nothing below was trained here." if record.get("weights_only") else
         f"A {name} encoder-decoder pretrained with SpacTor by spactor_mega for {int(record['step']):,} steps, "
         "exported by `spactor convert to-hf`. It is a pretrained model only: it fills the `<extra_id_k>` spans "
         "of its input; fine-tune it for a task."),
        "## Architecture", _architecture(cfg, vocab_rows, class_name),
        "## Parameters", _parameters(cfg, vocab_rows, with_rtd_head),
        "## Pretraining", _objective(cfg, record),
        "## Data", _data(cfg, datasets),
        "## Final validation", _validation(record),
        "## Precision and layout", _layout(cfg, record, dtype),
        "## How to use", f"Load it with its tokenizer (the path, or the Hub id it is uploaded to):\n\n"
                         + _usage(folder, class_name),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))
