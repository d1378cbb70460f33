"""Vocab-parallel Gumbel-max sampling at TP = 1, 2, 4 on a vocabulary of several noise blocks whose
shard boundaries fall inside blocks: the same samples bit for bit on every layout (fp32 and bf16
logits, two temperatures), and each rank draws noise only for the blocks its shard overlaps."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spactor_mega.parallel.testing import run_distributed

VOCAB = 28000  # 7 blocks of 4096 ids; TP = 2 and 4 shards end inside a block
ROWS, SLOTS = 3, 4


class CountUniformDraws(TorchDispatchMode):
    """Counts the uniform random numbers drawn (``torch.rand``, ``Tensor.uniform_``)."""

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.rand, torch.ops.aten.uniform_):
            self.drawn += out.numel()
        return out


def _samples(rank, world_size):
    from spactor_mega.model.generator import gumbel_max_sample
    from spactor_mega.model.losses import vocab_range
    from spactor_mega.parallel.state import destroy_parallel, initialize_parallel

    initialize_parallel(tp=world_size, seed=3)
    try:
        logits = 4 * torch.randn(ROWS, SLOTS, VOCAB, generator=torch.Generator().manual_seed(11))
        start, end = vocab_range(VOCAB // world_size)
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            for temperature in (1.0, 0.7):
                counter = CountUniformDraws()
                with counter:
                    out[dtype, temperature] = gumbel_max_sample(
                        logits[..., start:end].to(dtype), temperature=temperature, row_seeds=[5, 17, 2**62 + 9],
                        sample_vocab_size=27990, forbidden_ids=(0, 1, 4096),
                    )
                out["drawn", dtype, temperature] = counter.drawn
        return out
    finally:
        destroy_parallel()


def test_samples_equal_on_every_tp_layout_and_each_rank_draws_its_shard_only():
    from spactor_mega.model.generator import NOISE_BLOCK

    single = run_distributed(_samples, 1)[0]
    for tp in (2, 4):
        per_rank = run_distributed(_samples, tp)
        shard = VOCAB // tp
        for key, samples in single.items():
            if key[0] == "drawn":
                # at most the shard plus the two blocks it cuts into (before: the whole vocabulary)
                assert all(0 < r[key] <= ROWS * SLOTS * (shard + 2 * NOISE_BLOCK) for r in per_rank), (tp, key)
                continue
            for r in per_rank:
                assert torch.equal(r[key], samples), (tp, key)
    # not vacuous: distinct ids, none disallowed, and the temperature changes some samples
    s = single[torch.float32, 1.0]
    assert len(torch.unique(s)) > 4 and not torch.isin(s, torch.tensor([0, 1, 4096])).any() and s.max() < 27990
    assert not torch.equal(s, single[torch.float32, 0.7])
