"""The config-only parameter inventory names and shapes exactly what the built modules hold."""

import torch

from spactor_mega.model.synthetic import tiny_config
from spactor_mega.plan.dry_run import parameter_counts
from spactor_mega.plan.inventory import generator_parameter_shapes, rtd_head_parameter_shapes, t5_parameter_shapes


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def test_inventory_is_what_the_modules_hold():
    from spactor_mega.model.stages import build_spactor_modules
    from spactor_mega.parallel.state import single_process_parallel

    cfg = tiny_config(tau=10.0, depth_fraction=0.5, num_encoder_layers=3, num_decoder_layers=1)
    cfg.generator.num_heads, cfg.generator.d_ff = 1, 40  # G narrower than D: its own sizes are used
    vocab = 208
    with single_process_parallel():
        d, g, rtd = build_spactor_modules(cfg, vocab)
    assert _shapes(d) == t5_parameter_shapes(cfg.model, vocab)
    assert _shapes(g) == generator_parameter_shapes(cfg)
    assert _shapes(rtd) == rtd_head_parameter_shapes(cfg.model.d_model)
    built = {name: sum(p.numel() for p in m.parameters()) for name, m in
             (("discriminator", d), ("generator", g), ("rtd_head", rtd))}
    assert parameter_counts(cfg, vocab) == built
