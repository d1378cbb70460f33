"""One typed configuration for every command: the schema and its parsing, nothing else.

YAML presets (``configs/*.yaml``) fill the dataclasses; command-line flags named
``--section.field`` (e.g. ``--train.steps 200``) override them.

Every field has a comment (the lines above it and/or the one after it): that comment is its one
description, shown by ``--help`` and in the generated configuration reference of the docs. A field that
takes one of a few values starts its comment with them, ``a | b | c: meaning``; a field (or section
docstring) that only one engine reads says ``Megatron engine only`` / ``DeepSpeed engine only``.
:func:`spactor_mega.plan.validate.validate` rejects anything that cannot work with a one-line
reason naming the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import io
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from spactor_mega.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot work; the message names the field and the fix."""

    same_on_every_rank = True


INIT_SCHEMES = ("megatron", "t5")  # ModelConfig.init
FEED_FORWARDS = ("relu", "gated-gelu", "gated-silu")  # ModelConfig.feed_forward
HF_MODEL_TYPES = ("t5", "mt5", "umt5")  # ModelConfig.hf_model_type
WANDB_MODES = ("online", "offline", "disabled")  # LoggingConfig.wandb_mode


@dataclass
class ModelConfig:
    """The discriminator D: a T5 encoder-decoder (v1.1 by default; v1.0, mT5, UMT5 and UL2-style
    feed-forwards by the options below)."""

    d_model: int = 512  # width of the hidden states
    d_kv: int = 64  # width of one attention head's keys and values
    d_ff: int = 1024  # width of the feed-forward layers
    # relu | gated-gelu | gated-silu: the feed-forward (HF's feed_forward_proj); relu: T5 v1.0's wo(relu(wi x));
    # gated-gelu: T5 v1.1's, Flan-T5's, mT5's and UMT5's wo(gelu_new(wi_0 x) * wi_1 x); gated-silu: UL2-style, silu
    feed_forward: str = "gated-gelu"
    # true: the LM head is the token embedding and the decoder output is scaled by d_model**-0.5 before it
    # (T5 v1.0); false: an LM head of its own, no rescale (T5 v1.1, Flan-T5, mT5, UMT5)
    tie_word_embeddings: bool = False
    # true: a relative-position bias table in every layer's self-attention (UMT5); false: one per stack,
    # shared by its layers (T5, mT5)
    relative_attention_per_layer: bool = False
    # t5 | mt5 | umt5: the Hugging Face model type `spactor convert to-hf` writes; umt5 needs
    # relative_attention_per_layer, t5 and mt5 need it off, and mt5 an untied head (HF's MT5 never rescales)
    hf_model_type: str = "t5"
    num_heads: int = 6  # attention heads per layer
    num_encoder_layers: int = 8  # encoder layers
    num_decoder_layers: int = 8  # decoder layers
    relative_attention_num_buckets: int = 32  # T5's relative-position buckets
    relative_attention_max_distance: int = 128  # distance beyond which relative positions share a bucket
    dropout: float = 0.0  # dropout in D's and G's layers (T5 v1.1 pretrains with none)
    layer_norm_epsilon: float = 1e-6  # epsilon of T5's RMS norm
    # The embedding is padded to a multiple of lcm(this, TP), so it splits evenly and keeps its shape
    # for every TP dividing this; the padded rows are never produced by the tokenizer. 1024: every TP
    # shard up to TP 8 a multiple of 128 (HF export still cuts to the tokenizer's rows padded to 128).
    make_vocab_size_divisible_by: int = 128
    # megatron | t5: weight initialisation (spactor_mega/model/init.py); megatron: N(0, init_method_std),
    # output layers scaled by 1/sqrt(2 * layers); t5: mesh-tensorflow / HF T5's per-tensor fan-in scales
    # (attention logits of std ~1 at any width; G's tied head scaled by d_model**-0.5).
    init: str = "megatron"
    init_method_std: float = 0.02  # the "megatron" scheme's std
    # none | selective | full: Megatron's activation recompute, for D and G; selective recomputes core
    # attention, full whole layers from their input
    recompute: str = "none"
    # uniform | block: with recompute full, uniform checkpoints groups of recompute_num_layers layers; block
    # recomputes the first recompute_num_layers layers of each pipeline stage and keeps the rest
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1  # layers per recompute group (uniform) or recomputed per stage (block)
    # The license `spactor convert to-hf` states in the exported model card (README.md's metadata): a Hub
    # license id, e.g. apache-2.0, mit, cc-by-4.0, or other
    license: str = "apache-2.0"
    # Vocabulary rows before that padding, and the rows an HF export gets. None: the
    # tokenizer's pieces + sentinels + mask (exported padded to make_vocab_size_divisible_by);
    # `spactor convert from-hf` sets the imported model's vocab_size (e.g. 32128).
    vocab_size: Optional[int] = None


@dataclass
class GeneratorConfig:
    """The generator G: a small encoder-only stack sharing D's token embedding."""

    depth_fraction: float = 0.25  # G layers = round(fraction * D encoder layers), at least 1
    d_ff: Optional[int] = None  # None: D's d_ff
    num_heads: Optional[int] = None  # None: D's heads
    temperature: float = 1.0  # Gumbel-max sampling temperature


AUTO_TAU_SIGNALS = ("rtd_gain", "sc_gap", "grad_cosine")  # AutoTauConfig.signal


@dataclass
class AutoTauConfig:
    """With spactor.tau: auto, the hybrid phase ends where the chosen signal says it stops helping."""

    # rtd_gain | sc_gap | grad_cosine: what is measured every `interval` steps; rtd_gain: a hybrid validation's
    # RTD information gain (nats), past the threshold below threshold x its peak so far; sc_gap: its SC-loss
    # gap of replaced vs clean input, likewise; grad_cosine: the cosine of D's SC and auxiliary gradients on
    # a fixed validation micro-batch (two extra backward passes), past the threshold at or below it
    signal: str = "rtd_gain"
    threshold: float = 0.5  # rtd_gain, sc_gap: a fraction of the signal's peak in (0, 1); grad_cosine: a cosine
    patience: int = 3  # consecutive measurements past the threshold that end the hybrid phase there
    min_steps: int = 1000  # the hybrid phase lasts at least this many steps
    # ... and at most this many: tau is max_steps when the signal never says stop (the bound the FLOPs
    # model, the memory plan and --dry-run assume)
    max_steps: int = 100000
    interval: int = 500  # steps between measurements


@dataclass
class SpactorConfig:
    """The objective: span corruption, MLM on top, RTD, and the two-stage curriculum."""

    noise_density: float = 0.15  # fraction of a chunk's tokens span corruption replaces (T5: 0.15)
    mean_noise_span_length: float = 3.0  # mean length of a corrupted span (T5: 3)
    mlm_fraction: float = 0.15  # of SC input tokens that are not sentinels, EOS or pad
    # first SC-only step; 0 = plain T5, inf = hybrid throughout, auto = where the run's own signals say
    # (spactor.auto_tau)
    tau: Union[float, str] = 0
    auto_tau: AutoTauConfig = field(default_factory=AutoTauConfig)  # how tau: auto decides
    mlm_weight: float = 1.0  # weight of G's MLM loss in the hybrid phase
    rtd_weight: float = 10.0  # weight of D's replaced-token-detection loss in the hybrid phase
    z_loss: float = 0.0  # T5X's auxiliary z-loss on D's LM logits, z_loss * log(Z)^2 (T5X default 1e-4; 0: off)


@dataclass
class DataConfig:
    """Indexed datasets, tokenizer, lengths; and raw C4 files to build them from if missing."""

    train_data: list = field(default_factory=list)  # [prefix] or [weight, prefix, weight, ...]
    valid_data: list = field(default_factory=list)  # empty: held out of train by `split`
    split: str = "98,2,0"  # train,valid,test percentages of train_data when valid_data is empty (Megatron's)
    tokenizer: str = ""  # SentencePiece .model file, or a folder with spiece.model
    # When the tokenizer / a single-prefix dataset above is missing, build it from these:
    # C4 json(.gz) files or globs.
    train_corpus: list = field(default_factory=list)
    valid_corpus: list = field(default_factory=list)  # C4 json(.gz) files or globs to build valid_data from
    tokenizer_vocab_size: int = 32000  # pieces of a tokenizer trained from train_corpus (sentinels on top)
    # A tokenizer trained from train_corpus spells characters outside its vocabulary as UTF-8 byte pieces
    # (`<0xNN>`) instead of `<unk>` (`spactor tokenizer train --byte-fallback`)
    tokenizer_byte_fallback: bool = False
    # A tokenizer trained from train_corpus keeps newlines, tabs and runs of spaces and skips NFKC
    # (`--keep-whitespace`; needs tokenizer_byte_fallback): any text then round-trips exactly, code included
    tokenizer_keep_whitespace: bool = False
    preprocess_workers: int = 2  # tokenizer processes when building the datasets from the corpus
    encoder_seq_length: int = 512  # encoder input tokens per sample (the decoder's length follows from it)
    # Extra held-out indexed datasets (prefixes), evaluated like the validation split (clean SC loss and
    # accuracy) at every evaluation and reported under their file names: text the model never trains on
    eval_data: list = field(default_factory=list)
    # Index files of the datasets (built once, memory-mapped by every rank; a folder all ranks of a node
    # can write); None: Megatron's default, <prefix>/cache/SpactorDataset_indices beside the data.
    cache_dir: Optional[str] = None
    # DataLoader workers building the next steps' micro-batches (span corruption + MLM) while the
    # engine runs this one; 0: built in the step (train/data_wait_s; < 1% of a demo step, so 2
    # workers do not speed the demo up: see Benchmarks)
    num_workers: int = 0
    prefetch_factor: int = 2  # micro-batches each worker builds ahead (with num_workers > 0)
    # Passes over each training dataset the run may make (train.steps x global_batch_size samples); more is
    # refused before the model is built, naming the dataset: T5 pretraining reads its corpus once
    max_epochs: float = 1.0


@dataclass
class ParallelConfig:
    """Tensor, pipeline and data parallelism (DP is the rest of the world size)."""

    tensor_model_parallel_size: int = 1  # TP: each layer's matrices split over this many ranks
    # PP: the layers split over this many pipeline stages (Megatron engine only: DeepSpeed runs PP = 1)
    pipeline_model_parallel_size: int = 1
    # e.g. "E6|E6|D4|D4|D4": the layers of each pipeline stage; None: balanced by FLOPs (Megatron engine only)
    pipeline_layout: Optional[str] = None
    # V > 1: each pipeline rank holds V virtual stages (Megatron's interleaved schedule); the
    # layout then has PP * V stages in virtual order (rank r holds stages r, r + PP, ...) (Megatron engine only)
    virtual_pipeline_model_parallel_size: int = 1
    # Megatron's sequence parallelism (needs TP > 1): norms and dropout run on sequence shards (Megatron
    # engine only)
    sequence_parallel: bool = False
    # Megatron's distributed optimizer: optimizer state and fp32 main params sharded over DP
    # (ZeRO-1-like) (Megatron engine only)
    distributed_optimizer: bool = False
    # Start each gradient bucket's reduction during the backward (Megatron engine only)
    overlap_grad_reduce: bool = False
    # Start each bucket's parameter all-gather during the next forward; needs distributed_optimizer (Megatron
    # engine only)
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = None  # elements per gradient bucket; None: Megatron's default (Megatron engine only)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (Megatron's, for both engines)."""

    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5  # the schedule's floor (cosine, inverse-sqrt)
    # inverse-sqrt | constant-inverse-sqrt | cosine | constant: after a linear warmup; inverse-sqrt (Megatron's):
    # lr*sqrt(warmup/step); constant-inverse-sqrt (T5's): lr for the warmup steps, then lr*sqrt(warmup/step)
    lr_schedule: str = "inverse-sqrt"
    warmup_steps: int = 100  # steps of the warmup
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    adam_beta1: float = 0.9  # AdamW's beta1
    adam_beta2: float = 0.999  # AdamW's beta2
    adam_eps: float = 1e-8  # AdamW's epsilon
    clip_grad: float = 1.0  # global gradient-norm clipping; 0: off (T5 v1.1 with Adafactor clipped none)


@dataclass
class TrainConfig:
    """The run: engine, steps, batch, precision, checkpoints, resume, stops."""

    engine: str = "megatron"  # megatron | deepspeed
    steps: int = 1000  # optimizer steps of the run
    global_batch_size: int = 128  # sequences per step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank (accumulated to the global batch)
    seed: int = 1234  # seeds the weights, the data order, the masks and G's replacements
    # auto | fp32 | bf16: auto is bf16 on GPUs with native bf16 and fp32 elsewhere; bf16 trains bf16 weights
    # and activations with fp32 master weights, optimizer state and gradient reduction
    precision: str = "auto"
    save_dir: str = "runs/default/checkpoints"  # where checkpoints (iter_NNNNNNN/, latest) are written
    save_interval: int = 500  # steps between checkpoints (0: only at the end)
    # auto (the latest complete checkpoint), auto-previous (the latest, or if it is damaged the newest
    # complete one before it) or a checkpoint directory; None: start afresh
    resume: Optional[str] = None
    exit_interval: Optional[int] = None  # save and stop after a step that is a multiple of this
    exit_duration_minutes: Optional[float] = None  # save and stop once the run has trained this long
    # Checkpoints kept: the newest keep_last_checkpoints (0: all), plus every multiple of keep_every
    keep_last_checkpoints: int = 0
    keep_every: Optional[int] = None  # keep the checkpoints of this step's multiples as milestones
    # Write checkpoint shards in a background process while training goes on (Megatron engine only:
    # the DeepSpeed engine saves synchronously)
    async_save: bool = False
    # A step whose loss or gradient norm is not finite changes nothing and is counted; this many
    # in a row stop the run
    max_skipped_steps: int = 10
    distributed_timeout_minutes: float = 10.0  # process-group timeout for every collective
    # Print every rank's Python stack when a step takes more than hang_factor x the median step (0: off)
    hang_factor: float = 0.0
    eval_interval: int = 200  # steps between evaluations (0: none)
    eval_batches: int = 4  # micro-batches per data-parallel rank in an evaluation
    # The device's peak TFLOP/s for MFU; None: known for A100, H100 (SXM, PCIe, NVL), H200, GH200
    # (bf16, or TF32 for fp32 runs), MFU not reported elsewhere (CPUs)
    peak_tflops: Optional[float] = None
    # fp32 matmuls on CUDA use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation; the
    # fp32 peak MFU is measured against); false: full fp32 (IEEE) matmuls, several times slower
    allow_tf32: bool = True


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (train.engine: deepspeed): ZeRO stage and offload (DeepSpeed engine only)."""

    # 0 | 1 | 2 | 3: what ZeRO splits over DP: 1 the optimizer states, 2 also the gradients, 3 also the
    # parameters (0: replicated, as DDP)
    zero_stage: int = 2
    # none | cpu | nvme: where the optimizer states (fp32 master + Adam moments) live, off the GPU
    offload_optimizer: str = "none"
    offload_param: str = "none"  # none | cpu | nvme: parameters off the GPU between uses (zero_stage 3 only)
    nvme_path: Optional[str] = None  # a fast local directory, for nvme offload
    config: Optional[str] = None  # a DeepSpeed JSON file merged over the config generated from ours


@dataclass
class LoggingConfig:
    """Console, TensorBoard, Weights & Biases and the metrics file."""

    log_interval: int = 10  # steps between `[train]` lines and TensorBoard scalars
    tensorboard_dir: str = "runs/default/tensorboard"  # TensorBoard event files
    # JSON lines, one per step ({"split": "train", "step", metrics}) and per evaluation ("valid", or the
    # extra set's name): what `spactor study` reads, and a plain-text record of the run (None: not written)
    metrics_file: Optional[str] = None
    progress: bool = True  # a progress bar with loss, phase and ETA on rank 0
    # Weights & Biases beside TensorBoard (the `wandb` extra): the same scalars under the same names and
    # the resolved config, from rank 0, into this project ("": no W&B); a resumed run continues its W&B run
    wandb_project: str = ""
    wandb_entity: Optional[str] = None  # the W&B user or team (None: the account's default)
    wandb_run_name: Optional[str] = None  # None: a name W&B makes up
    wandb_group: Optional[str] = None  # runs shown together (`spactor study`: the study's)
    wandb_tags: list = field(default_factory=list)  # `spactor study`: the arm and the seed
    # online | offline | disabled: offline writes the run's files only (`wandb sync` uploads them later);
    # None: the WANDB_MODE variable, else online
    wandb_mode: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    spactor: SpactorConfig = field(default_factory=SpactorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _subsections() -> dict[str, type]:
    """``{"section" or "section.sub": its dataclass}``: the sections and, inside them, the fields
    that are sections of their own (``spactor.auto_tau``), set as ``section.sub.field``."""
    out = {}

    def walk(prefix: str, cls: type) -> None:
        out[prefix] = cls
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                walk(f"{prefix}.{name}", hint)

    for name, cls in _section_types().items():
        walk(name, cls)
    return out


@functools.lru_cache(maxsize=None)
def leaf_fields() -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` of every field a user sets, named ``section.field`` or
    ``section.sub.field``, in the schema's order."""
    out = {}
    for prefix, cls in _subsections().items():
        hints, defaults = typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                out[f"{prefix}.{f.name}"] = (hints[f.name], getattr(defaults, f.name))
    return dict(sorted(out.items(), key=lambda item: list(_subsections()).index(item[0].rsplit(".", 1)[0])))


def _parse_value(raw: str, annotation: Any) -> Any:
    """Parses a command-line string into the field's declared type (a union: the first that parses)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and args:
        if type(None) in typing.get_args(annotation) and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in args:
            try:
                return _parse_value(raw, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if annotation is float:
        try:
            return float(raw)  # accepts "inf"
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if annotation is list or origin is list:
        return yaml.safe_load(raw) if raw.startswith("[") else [v for v in raw.split(",") if v]
    return raw


def _as_declared_number(value: Any, annotation: Any) -> Any:
    """A YAML value for a numeric field as its declared type, or ValueError. YAML reads ``100`` as an int
    (a float field gets a float) and ``1e-3`` as a string (it needs ``1.0e-3``): parsed as a flag is."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if int not in kinds and float not in kinds:
        return value
    if isinstance(value, str):
        return _parse_value(value, annotation)
    if value is None and type(None) in typing.get_args(annotation):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {'an integer' if float not in kinds else 'a number'}, got {value!r}")
    if float in kinds:
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def set_field(cfg: "Config", name: str, value: Any, where: str = "config") -> None:
    """Sets the field ``name`` (``section.field`` or ``section.sub.field``); a mapping given for a
    subsection sets its fields. Unknown names are refused naming the known ones."""
    section, _, rest = name.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
    target, path, keys = getattr(cfg, section), section, rest.split(".")
    for i, key in enumerate(keys):
        names = {f.name for f in dataclasses.fields(target)}
        if key not in names:
            raise ConfigError(f"{where}: unknown field {path}.{key}; known: {', '.join(sorted(names))}")
        path = f"{path}.{key}"
        if i < len(keys) - 1:
            target = getattr(target, key)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{where}: {path} is a field, not a section")
    if dataclasses.is_dataclass(getattr(target, key)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} must be a mapping of its fields")
        for sub, sub_value in value.items():
            set_field(cfg, f"{path}.{sub}", sub_value, where)
        return
    try:
        setattr(target, key, _as_declared_number(value, leaf_fields()[path][0]))
    except ValueError as e:
        raise ConfigError(f"{where}: {path}: {e}") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML document (``{}`` when empty); a missing file or bad YAML is one line naming the file."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_yaml(path: str | Path, cfg: Optional[Config] = None) -> Config:
    """Fills ``cfg`` (default: defaults) from a YAML file of ``section: {field: value}``."""
    return config_from_dict(read_yaml(path), str(path), cfg)


def config_from_dict(doc: Any, where: str, cfg: Optional[Config] = None) -> Config:
    """Fills ``cfg`` (default: defaults) from ``{section: {field: value}}`` (a YAML preset, or the
    ``config`` a checkpoint's run.json records); ``where`` names the source in errors."""
    cfg = cfg or Config()
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(doc).__name__}")
    for section, values in doc.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for key, value in values.items():
            set_field(cfg, f"{section}.{key}", value, where)
    return cfg


def _comment_text(lines: list[str]) -> str:
    return " ".join(line.strip().lstrip("#").strip() for line in lines).strip()


@functools.lru_cache(maxsize=None)
def field_comments() -> dict[str, str]:
    """``{"section.field": text}``: the comment lines right above each field of the schema and the comment
    after it, joined. These comments are the one description of a field: ``--help`` and the configuration
    reference (docs, :mod:`spactor_mega.plan.config_reference`) read them from here."""
    source = Path(__file__).read_text()
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].lstrip()[:1] != "#"}
    sections = {t.__name__: name for name, t in _subsections().items()}
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above, i = [], stmt.lineno - 2
                while i >= 0 and lines[i].lstrip().startswith("#"):
                    above.insert(0, lines[i])
                    i -= 1
                after = [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
                out[f"{sections[node.name]}.{stmt.target.id}"] = _comment_text(above + after)
    return {name: out[name] for name in leaf_fields()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one ``--section.field`` flag per config field."""
    parser.add_argument("--config", help="YAML preset (see configs/); flags below override it")
    fields = leaf_fields()
    for section, section_type in _section_types().items():
        group = parser.add_argument_group(f"{section} ({section_type.__doc__ or ''}".strip() + ")")
        for name, (_, default) in fields.items():
            if name.split(".")[0] != section:
                continue
            group.add_argument(
                f"--{name}",
                dest=f"cfg:{name}",
                metavar="VALUE",
                default=argparse.SUPPRESS,
                help=f"{field_comments()[name]} (default: {default})".replace("%", "%%"),  # argparse formats %
            )


def config_from_args(args: argparse.Namespace) -> Config:
    """Builds the config: defaults <- YAML (``--config``) <- ``--section.field`` flags."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    fields = leaf_fields()
    for dest, raw in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        name = dest[4:]
        try:
            value = _parse_value(raw, fields[name][0])
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}") from None
        set_field(cfg, name, value, f"--{name}")
    return cfg
