"""One typed configuration for every command: the schema and its parsing, nothing else.

YAML presets (``configs/*.yaml``) fill the dataclasses; command-line flags named
``--section.field`` (e.g. ``--train.steps 200``) override them.
:func:`spactor_mega.plan.validate.validate` rejects anything that cannot work with a one-line
reason naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from spactor_mega.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot work; the message names the field and the fix."""

    same_on_every_rank = True


INIT_SCHEMES = ("megatron", "t5")  # ModelConfig.init


@dataclass
class ModelConfig:
    """The discriminator D: a T5 v1.1 encoder-decoder."""

    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    # The embedding is padded to a multiple of lcm(this, TP), so it splits evenly and keeps its shape
    # for every TP dividing this; the padded rows are never produced by the tokenizer. 1024: every TP
    # shard up to TP 8 a multiple of 128 (HF export still cuts to the tokenizer's rows padded to 128).
    make_vocab_size_divisible_by: int = 128
    # Weight initialisation (spactor_mega/model/init.py): "megatron" = N(0, init_method_std),
    # output layers scaled by 1/sqrt(2 * layers); "t5" = mesh-tensorflow / HF T5's per-tensor
    # fan-in scales (attention logits of std ~1 at any width; G's tied head scaled by d_model**-0.5).
    init: str = "megatron"
    init_method_std: float = 0.02  # the "megatron" scheme's std
    # Activation recompute (Megatron's), for D and G: none | selective (core attention) | full
    # (whole layers: "uniform" checkpoints groups of recompute_num_layers layers; "block"
    # recomputes the first recompute_num_layers layers of each pipeline stage and keeps the rest)
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
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


@dataclass
class SpactorConfig:
    """The objective: span corruption, MLM on top, RTD, and the two-stage curriculum."""

    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    mlm_fraction: float = 0.15  # of SC input tokens that are not sentinels, EOS or pad
    tau: float = 0  # first SC-only step; 0 = plain T5, inf = hybrid throughout
    mlm_weight: float = 1.0
    rtd_weight: float = 10.0
    z_loss: float = 0.0  # T5X's auxiliary z-loss on D's LM logits, z_loss * log(Z)^2 (T5X default 1e-4; 0: off)


@dataclass
class DataConfig:
    """Indexed datasets, tokenizer, lengths; and raw C4 files to build them from if missing."""

    train_data: list = field(default_factory=list)  # [prefix] or [weight, prefix, weight, ...]
    valid_data: list = field(default_factory=list)  # empty: held out of train by `split`
    split: str = "98,2,0"
    tokenizer: str = ""  # SentencePiece .model file, or a folder with spiece.model
    # When the tokenizer / a single-prefix dataset above is missing, build it from these.
    train_corpus: list = field(default_factory=list)  # C4 json(.gz) files or globs
    valid_corpus: list = field(default_factory=list)
    tokenizer_vocab_size: int = 32000
    preprocess_workers: int = 2
    encoder_seq_length: int = 512
    # Extra held-out indexed datasets (prefixes), evaluated like the validation split (clean SC loss and
    # accuracy) at every evaluation and reported under their file names: text the model never trains on
    eval_data: list = field(default_factory=list)
    # Index files of the datasets (built once, memory-mapped by every rank; a folder all ranks of a node
    # can write); None: Megatron's default, <prefix>/cache/SpactorDataset_indices beside the data.
    cache_dir: Optional[str] = None
    # DataLoader workers building the next steps' micro-batches (span corruption + MLM) while the
    # engine runs this one; 0: built in the step (train/data_wait_s; < 1% of a demo step, so 2
    # workers do not speed the demo up: README, Benchmarks)
    num_workers: int = 0
    prefetch_factor: int = 2  # micro-batches each worker builds ahead (with num_workers > 0)
    # Passes over each training dataset the run may make (train.steps x global_batch_size samples); more is
    # refused before the model is built, naming the dataset: T5 pretraining reads its corpus once
    max_epochs: float = 1.0


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_layout: Optional[str] = None  # e.g. "E6|E6|D4|D4|D4"; None: balanced by FLOPs
    # V > 1: each pipeline rank holds V virtual stages (Megatron's interleaved schedule); the
    # layout then has PP * V stages in virtual order (rank r holds stages r, r + PP, ...)
    virtual_pipeline_model_parallel_size: int = 1
    # Megatron's sequence parallelism (needs TP > 1): norms and dropout run on sequence shards
    sequence_parallel: bool = False
    # Megatron's distributed optimizer: optimizer state and fp32 main params sharded over DP
    # (ZeRO-1-like); the gradient reduce-scatter and the parameter all-gather can overlap the
    # backward and the next forward, in buckets of bucket_size elements (None: Megatron's default)
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = None


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 1e-3
    min_lr: float = 1e-5
    # inverse-sqrt: linear warmup, then lr*sqrt(warmup/step) (Megatron) | constant-inverse-sqrt: T5's,
    # lr for the warmup steps, then lr*sqrt(warmup/step) | cosine | constant (all after a linear warmup)
    lr_schedule: str = "inverse-sqrt"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clipping; 0: off (T5 v1.1 with Adafactor clipped none)


@dataclass
class TrainConfig:
    engine: str = "megatron"  # megatron | deepspeed
    steps: int = 1000
    global_batch_size: int = 128
    micro_batch_size: int = 8
    seed: int = 1234
    # auto (bf16 on GPUs with native bf16, fp32 elsewhere) | fp32 | bf16 (bf16 weights and activations;
    # fp32 master weights, optimizer state and gradient reduction)
    precision: str = "auto"
    save_dir: str = "runs/default/checkpoints"
    save_interval: int = 500
    # None | auto (the latest complete checkpoint) | auto-previous (the latest, or if it is damaged
    # the newest complete one before it) | a checkpoint directory
    resume: Optional[str] = None
    exit_interval: Optional[int] = None  # save and stop after a step that is a multiple of this
    exit_duration_minutes: Optional[float] = None  # save and stop once the run has trained this long
    # Checkpoints kept: the newest keep_last_checkpoints (0: all), plus every multiple of keep_every
    keep_last_checkpoints: int = 0
    keep_every: Optional[int] = None
    # Write checkpoint shards in a background process while training goes on (Megatron engine only:
    # the DeepSpeed engine saves synchronously)
    async_save: bool = False
    # A step whose loss or gradient norm is not finite changes nothing and is counted; this many
    # in a row stop the run
    max_skipped_steps: int = 10
    distributed_timeout_minutes: float = 10.0  # process-group timeout for every collective
    # Print every rank's Python stack when a step takes more than hang_factor x the median step (0: off)
    hang_factor: float = 0.0
    eval_interval: int = 200
    eval_batches: int = 4
    # The device's peak TFLOP/s for MFU; None: known for A100/H100/H200 (bf16, or TF32 for fp32 runs),
    # MFU not reported elsewhere (CPUs)
    peak_tflops: Optional[float] = None
    # fp32 matmuls on CUDA use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation; the
    # fp32 peak MFU is measured against); false: full fp32 (IEEE) matmuls, several times slower
    allow_tf32: bool = True


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (train.engine: deepspeed): ZeRO stage and offload."""

    zero_stage: int = 2  # 0: replicated (DDP) | 1: optimizer states | 2: + gradients | 3: + parameters, split over DP
    offload_optimizer: str = "none"  # none | cpu | nvme: optimizer states (fp32 master + Adam moments) off the GPU
    offload_param: str = "none"  # none | cpu | nvme: parameters off the GPU between uses (zero_stage 3 only)
    nvme_path: Optional[str] = None  # a fast local directory, for nvme offload
    config: Optional[str] = None  # a DeepSpeed JSON file merged over the config generated from ours


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str = "runs/default/tensorboard"
    # JSON lines, one per step ({"split": "train", "step", metrics}) and per evaluation ("valid", or the
    # extra set's name): what `spactor study` reads, and a plain-text record of the run (None: not written)
    metrics_file: Optional[str] = None
    progress: bool = True


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


def _parse_value(raw: str, annotation: Any) -> Any:
    """Parses a command-line string into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and args:
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse_value(raw, args[0])
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if annotation is int:
        return int(raw)
    if annotation is float:
        return float(raw)  # accepts "inf"
    if annotation is list or origin is list:
        return yaml.safe_load(raw) if raw.startswith("[") else [v for v in raw.split(",") if v]
    return raw


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
    sub = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(sub)}
    if key not in names:
        raise ConfigError(f"{where}: unknown field {section}.{key}; known: {', '.join(sorted(names))}")
    setattr(sub, key, value)


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
    hints = {name: typing.get_type_hints(t) for name, t in _section_types().items()}
    for section, values in doc.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for key, value in values.items():
            if section in hints and key in hints[section] and hints[section][key] is float and value is not None:
                value = float(value)  # YAML reads `.inf` and `1e-3` fine, but `100` as int
            _apply(cfg, section, key, value, where)
    return cfg


# What --help says of a field besides its default, where the name alone does not tell
FIELD_HELP = {
    "train.resume": "auto (the latest complete checkpoint), auto-previous (or, if it is damaged, the newest "
                    "complete one before it) or a checkpoint folder",
    "train.async_save": "write checkpoint shards in a background process while training goes on (Megatron "
                        "engine; the DeepSpeed engine saves synchronously)",
    "train.keep_last_checkpoints": "checkpoints kept: the newest N (0: all), plus train.keep_every's multiples",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one ``--section.field`` flag per config field."""
    parser.add_argument("--config", help="YAML preset (see configs/); flags below override it")
    for section, section_type in _section_types().items():
        group = parser.add_argument_group(f"{section} ({section_type.__doc__ or ''}".strip() + ")")
        defaults = section_type()
        for f in dataclasses.fields(section_type):
            default = getattr(defaults, f.name)
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"cfg:{section}.{f.name}",
                metavar="VALUE",
                default=argparse.SUPPRESS,
                help=" ".join(filter(None, (FIELD_HELP.get(f"{section}.{f.name}"), f"(default: {default})"))),
            )


def config_from_args(args: argparse.Namespace) -> Config:
    """Builds the config: defaults <- YAML (``--config``) <- ``--section.field`` flags."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    hints = {name: typing.get_type_hints(t) for name, t in _section_types().items()}
    for dest, raw in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        section, key = dest[4:].split(".", 1)
        try:
            value = _parse_value(raw, hints[section][key])
        except ValueError as e:
            raise ConfigError(f"--{section}.{key}: {e}") from None
        _apply(cfg, section, key, value, f"--{section}.{key}")
    return cfg
