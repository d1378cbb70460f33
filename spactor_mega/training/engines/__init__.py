"""Training engines: Megatron-Core (DDP + distributed optimizer) and DeepSpeed ZeRO.

Both offer the interface the loop uses: ``train_step``, ``eval_step``, ``release_generator``,
``has_generator``, ``parameter_counts``, ``save(save_dir, step, record, tokenizer_file)`` and
``load(path)``.
"""

from __future__ import annotations


def build_engine(cfg, discriminator, generator, rtd_head, loss_fn, bf16: bool):
    """The engine ``cfg.train.engine`` names, over the modules of this rank."""
    if cfg.train.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, discriminator, generator, rtd_head, loss_fn, bf16)
    from .megatron import MegatronEngine

    return MegatronEngine(cfg, discriminator, generator, rtd_head, loss_fn, bf16)
