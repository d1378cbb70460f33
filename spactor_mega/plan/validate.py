"""Every rejection of a config that cannot work, in one place: one line naming the field and the
fix, before any process group or model exists. ``spactor train`` (and ``--dry-run``, ``prepare``,
``convert from-hf``) run it once per command; each engine adds its own checks
(:mod:`spactor_mega.plan.engines`)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

from spactor_mega.config import (
    AUTO_TAU_SIGNALS,
    FEED_FORWARDS,
    HF_MODEL_TYPES,
    INIT_SCHEMES,
    WANDB_MODES,
    Config,
    ConfigError,
)
from spactor_mega.curriculum import RELATIVE_SIGNALS
from spactor_mega.data.tokenizer import KEEP_WHITESPACE_NEEDS_BYTES
from spactor_mega.plan.derived import generator_num_layers, uses_bf16, uses_wandb
from spactor_mega.plan.engines import ENGINES, engine_spec
from spactor_mega.plan.layout import config_layout


def _validate_auto_tau(a, need) -> None:
    """``spactor.auto_tau`` (with ``spactor.tau: auto``), one line per field."""
    need(a.signal in AUTO_TAU_SIGNALS,
         f"spactor.auto_tau.signal must be one of {', '.join(AUTO_TAU_SIGNALS)}, got {a.signal!r}")
    if a.signal in RELATIVE_SIGNALS:
        need(0 < a.threshold < 1, f"spactor.auto_tau.threshold must be in (0, 1) for signal {a.signal} (a fraction of "
             f"its peak), got {a.threshold}")
    else:
        need(-1 <= a.threshold <= 1, f"spactor.auto_tau.threshold must be in [-1, 1] for signal {a.signal} (a cosine), "
             f"got {a.threshold}")
    need(a.patience >= 1, f"spactor.auto_tau.patience must be >= 1, got {a.patience}")
    need(a.interval >= 1, f"spactor.auto_tau.interval must be >= 1, got {a.interval}")
    need(a.max_steps >= 1, f"spactor.auto_tau.max_steps must be >= 1, got {a.max_steps}")
    need(1 <= a.min_steps <= a.max_steps, f"spactor.auto_tau.min_steps must be in [1, max_steps={a.max_steps}], got "
         f"{a.min_steps}")


def _validate_wandb(cfg: Config, need) -> None:
    """``logging.wandb_*``: the mode, and the optional package present when W&B is asked for."""
    lg = cfg.logging
    need(lg.wandb_mode is None or lg.wandb_mode in WANDB_MODES,
         f"logging.wandb_mode must be one of {', '.join(WANDB_MODES)} (or unset: WANDB_MODE, else online), "
         f"got {lg.wandb_mode!r}")
    need(isinstance(lg.wandb_project, str), f"logging.wandb_project must be a name, got {lg.wandb_project!r}")
    need(isinstance(lg.wandb_tags, list), f"logging.wandb_tags must be a list, got {lg.wandb_tags!r}")
    if uses_wandb(cfg):
        need(importlib.util.find_spec("wandb") is not None,
             f"logging.wandb_project={lg.wandb_project}: the wandb package is not installed; "
             "pip install 'spactor_mega[wandb]' (or leave logging.wandb_project empty)")


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Rejects a config that cannot work, naming the field and the fix. Returns ``cfg``."""
    m, g, s, p, t, o = cfg.model, cfg.generator, cfg.spactor, cfg.parallel, cfg.train, cfg.optim

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    # T5's bucketing halves the buckets per direction and puts half of those below the exact range:
    # the encoder needs >= 4 buckets, and positions past that exact range to share the log-spaced ones
    need(m.relative_attention_num_buckets >= 4,
         f"model.relative_attention_num_buckets must be >= 4 (T5: 32), got {m.relative_attention_num_buckets}")
    need(m.relative_attention_max_distance > m.relative_attention_num_buckets // 2,
         f"model.relative_attention_max_distance must exceed relative_attention_num_buckets / 2 = "
         f"{m.relative_attention_num_buckets // 2} (T5: 128), got {m.relative_attention_max_distance}")
    need(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(m.layer_norm_epsilon > 0, f"model.layer_norm_epsilon must be positive (T5: 1e-6), got {m.layer_norm_epsilon}")
    need(m.init_method_std > 0, f"model.init_method_std must be positive, got {m.init_method_std}")
    for name in ("d_ff", "num_heads"):
        value = getattr(g, name)
        need(value is None or value > 0, f"generator.{name} must be positive, or unset for D's, got {value}")
    need(0.0 < s.noise_density < 1.0, f"spactor.noise_density must be in (0, 1), got {s.noise_density}")
    need(s.mean_noise_span_length >= 1.0, f"spactor.mean_noise_span_length must be >= 1, got {s.mean_noise_span_length}")
    need(0.0 <= s.mlm_fraction < 1.0, f"spactor.mlm_fraction must be in [0, 1), got {s.mlm_fraction}")
    need(s.tau == "auto" or (isinstance(s.tau, (int, float)) and not isinstance(s.tau, bool) and not math.isnan(s.tau)
                             and s.tau >= 0),
         f"spactor.tau must be >= 0 (0 = plain T5, inf = hybrid throughout) or auto, got {s.tau!r}")
    _validate_auto_tau(s.auto_tau, need)  # unused unless tau is auto, but a bad value is refused either way
    need(s.mlm_weight >= 0, f"spactor.mlm_weight must be >= 0, got {s.mlm_weight}")
    need(s.rtd_weight >= 0, f"spactor.rtd_weight must be >= 0, got {s.rtd_weight}")
    need(s.z_loss >= 0, f"spactor.z_loss must be >= 0 (T5X uses 1e-4; 0 turns it off), got {s.z_loss}")
    need(g.temperature > 0, f"generator.temperature must be > 0, got {g.temperature}")
    need(0 < g.depth_fraction <= 1, f"generator.depth_fraction must be in (0, 1], got {g.depth_fraction}")
    need(cfg.data.encoder_seq_length >= 8, f"data.encoder_seq_length must be >= 8, got {cfg.data.encoder_seq_length}")
    need(cfg.data.num_workers >= 0 and cfg.data.prefetch_factor >= 1, "data.num_workers must be >= 0 and "
         f"data.prefetch_factor >= 1, got {cfg.data.num_workers} and {cfg.data.prefetch_factor}")
    need(cfg.data.max_epochs > 0, f"data.max_epochs must be positive, got {cfg.data.max_epochs}")
    need(cfg.data.tokenizer_vocab_size > 0,
         f"data.tokenizer_vocab_size must be positive, got {cfg.data.tokenizer_vocab_size}")
    need(cfg.data.preprocess_workers >= 1,
         f"data.preprocess_workers must be >= 1, got {cfg.data.preprocess_workers}")
    need(cfg.data.tokenizer_byte_fallback or not cfg.data.tokenizer_keep_whitespace, KEEP_WHITESPACE_NEEDS_BYTES.format(
        keep="data.tokenizer_keep_whitespace", bytes="data.tokenizer_byte_fallback: true"))
    # an extra evaluation set is reported under its file name: it must not collide with another's or a split's
    eval_names = [Path(str(prefix)).name for prefix in cfg.data.eval_data]
    need(len(set(eval_names)) == len(eval_names) and not {"train", "valid"} & set(eval_names),
         f"data.eval_data {cfg.data.eval_data}: each extra evaluation set is reported under its file name, so the "
         "names must differ from each other and from `train` and `valid`; rename or link the files")

    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    need(tp >= 1, f"parallel.tensor_model_parallel_size must be >= 1, got {tp}")
    need(pp >= 1, f"parallel.pipeline_model_parallel_size must be >= 1, got {pp}")
    need(world_size % (tp * pp) == 0,
         f"world size {world_size} is not divisible by tensor x pipeline parallel size {tp}x{pp}; "
         "launch a multiple of TP*PP processes")
    dp = world_size // (tp * pp)
    heads = [("model.num_heads", m.num_heads)]
    if g.num_heads is not None:
        heads.append(("generator.num_heads", g.num_heads))
    for name, value in heads:
        need(value % tp == 0, f"{name}={value} is not divisible by parallel.tensor_model_parallel_size={tp}")
    for name, value in (("model.d_ff", m.d_ff),) + ((("generator.d_ff", g.d_ff),) if g.d_ff is not None else ()):
        need(value % tp == 0, f"{name}={value} is not divisible by parallel.tensor_model_parallel_size={tp}")
    need(m.make_vocab_size_divisible_by > 0, "model.make_vocab_size_divisible_by must be positive")
    need(isinstance(m.license, str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", m.license) is not None,
         f"model.license must be a Hub license id (lowercase, e.g. apache-2.0, mit, cc-by-4.0, other), got {m.license!r}")
    need(m.recompute in ("none", "selective", "full"),
         f"model.recompute must be none, selective or full, got {m.recompute!r}")
    need(m.recompute_method in ("uniform", "block"),
         f"model.recompute_method must be uniform or block, got {m.recompute_method!r}")
    need(m.recompute_num_layers >= 1, f"model.recompute_num_layers must be >= 1, got {m.recompute_num_layers}")
    need(m.init in INIT_SCHEMES, f"model.init must be one of {', '.join(INIT_SCHEMES)}, got {m.init!r}")
    need(m.feed_forward in FEED_FORWARDS,
         f"model.feed_forward must be one of {', '.join(FEED_FORWARDS)}, got {m.feed_forward!r}")
    need(m.hf_model_type in HF_MODEL_TYPES,
         f"model.hf_model_type must be one of {', '.join(HF_MODEL_TYPES)}, got {m.hf_model_type!r}")
    need(m.relative_attention_per_layer == (m.hf_model_type == "umt5"),
         f"model.relative_attention_per_layer={m.relative_attention_per_layer} does not fit model.hf_model_type="
         f"{m.hf_model_type}: UMT5 has a bias table per layer, T5 and mT5 one per stack; change one of them")
    need(not (m.tie_word_embeddings and m.hf_model_type == "mt5"),
         "model.tie_word_embeddings=true with model.hf_model_type=mt5: HF's MT5 never rescales a tied head; "
         "use hf_model_type t5 for a tied model")
    need(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size must be positive or unset, got {m.vocab_size}")

    need(t.engine in ENGINES, f"train.engine must be one of {', '.join(ENGINES)}, got {t.engine!r}")
    need(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    need(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    need(0 <= t.seed < 2**32, f"train.seed must be in [0, 2**32), got {t.seed}")
    need(t.save_interval >= 0, f"train.save_interval must be >= 0 (0: only at the end), got {t.save_interval}")
    need(t.exit_interval is None or t.exit_interval > 0,
         f"train.exit_interval must be positive (or unset: no step-count stop), got {t.exit_interval}")
    need(t.eval_interval >= 0, f"train.eval_interval must be >= 0 (0: no evaluations), got {t.eval_interval}")
    need(t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}")
    need(cfg.logging.log_interval >= 1, f"logging.log_interval must be >= 1, got {cfg.logging.log_interval}")
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x data-parallel "
         f"size = {t.micro_batch_size}x{dp}; change one of them")
    need(not p.sequence_parallel or tp > 1, "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1 "
         "(it shards the sequence over the tensor-parallel group)")
    need(not p.sequence_parallel or cfg.data.encoder_seq_length % tp == 0,
         f"data.encoder_seq_length={cfg.data.encoder_seq_length} is not divisible by "
         f"parallel.tensor_model_parallel_size={tp} (parallel.sequence_parallel shards the sequence); change one")
    need(p.bucket_size is None or p.bucket_size > 0, f"parallel.bucket_size must be positive (or unset), got {p.bucket_size}")
    need(not p.overlap_param_gather or p.distributed_optimizer, "parallel.overlap_param_gather needs "
         "parallel.distributed_optimizer: true (only the distributed optimizer gathers parameters)")
    vp = p.virtual_pipeline_model_parallel_size
    need(vp >= 1, f"parallel.virtual_pipeline_model_parallel_size must be >= 1, got {vp}")
    if vp > 1:
        need(pp > 1, f"parallel.virtual_pipeline_model_parallel_size={vp} needs "
             "parallel.pipeline_model_parallel_size > 1 (virtual stages interleave over pipeline ranks)")
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        need(micro_batches % pp == 0,
             f"parallel.virtual_pipeline_model_parallel_size={vp}: the {micro_batches} micro-batches per step "
             f"(train.global_batch_size / (micro_batch_size x DP)) must be a multiple of "
             f"parallel.pipeline_model_parallel_size={pp} (Megatron's interleaved schedule)")
        need(t.eval_interval <= 0 or t.eval_batches % pp == 0,
             f"parallel.virtual_pipeline_model_parallel_size={vp}: train.eval_batches={t.eval_batches} must be a "
             f"multiple of parallel.pipeline_model_parallel_size={pp} (Megatron's interleaved schedule)")
    need(t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}"
         + (" (fp16 is not offered: it needs loss scaling, bf16 does not)" if t.precision == "fp16" else ""))
    uses_bf16(cfg)  # a GPU that cannot compute in bf16 is refused here, naming train.precision
    need(o.optimizer in ("adamw", "adafactor"), f"optim.optimizer must be adamw or adafactor, got {o.optimizer!r}")
    need(o.lr_schedule in ("inverse-sqrt", "constant-inverse-sqrt", "cosine", "constant"),
         f"optim.lr_schedule must be inverse-sqrt, constant-inverse-sqrt, cosine or constant, got {o.lr_schedule!r}")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]; lower optim.min_lr")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(o, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    need(o.adam_eps > 0, f"optim.adam_eps must be positive (it keeps Adam's update finite), got {o.adam_eps}")
    need(t.peak_tflops is None or t.peak_tflops > 0,
         f"train.peak_tflops must be positive (or unset for the known GPUs' peaks), got {t.peak_tflops}")
    need(isinstance(t.allow_tf32, bool), f"train.allow_tf32 must be true or false, got {t.allow_tf32!r}")
    need(o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0: no clipping), got {o.clip_grad}")
    need(t.hang_factor == 0 or t.hang_factor > 1,
         f"train.hang_factor must be 0 (off) or above 1 (a multiple of the median step), got {t.hang_factor}")
    need(t.exit_duration_minutes is None or t.exit_duration_minutes > 0,
         f"train.exit_duration_minutes must be positive (or unset: no wall-clock stop), got {t.exit_duration_minutes}")
    need(t.distributed_timeout_minutes > 0,
         f"train.distributed_timeout_minutes must be positive, got {t.distributed_timeout_minutes}")
    need(t.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1 (non-finite steps in a row that stop "
         f"the run), got {t.max_skipped_steps}")
    need(t.keep_last_checkpoints >= 0,
         f"train.keep_last_checkpoints must be >= 0 (0: keep every checkpoint), got {t.keep_last_checkpoints}")
    need(t.keep_every is None or t.keep_every > 0,
         f"train.keep_every must be positive (keep the checkpoints of its multiples) or unset, got {t.keep_every}")
    stacks = [("the encoder", m.num_encoder_layers), ("the decoder", m.num_decoder_layers),
              ("the generator", generator_num_layers(cfg))]
    if pp > 1 or p.pipeline_layout:  # also refuses more stages than layers, naming both
        layout = config_layout(cfg)
        stacks = [(f"pipeline stage {i} ({stage.describe()})", n) for i, stage in enumerate(layout.stages)
                  for n in (len(stage.encoder_layers), len(stage.decoder_layers)) if n] + stacks[2:]
    if m.recompute == "full" and m.recompute_method == "uniform":
        # Megatron's uniform method checkpoints groups of recompute_num_layers and indexes past a
        # stack whose layer count the group size does not divide
        for where, layers in stacks:
            need(layers % m.recompute_num_layers == 0,
                 f"model.recompute_num_layers={m.recompute_num_layers} does not divide the {layers} layers of "
                 f"{where} (model.recompute_method uniform); choose a divisor or recompute_method block")
    _validate_wandb(cfg, need)
    engine_spec(t.engine).plan.validate(cfg, dp)
    return cfg
