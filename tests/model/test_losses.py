"""Loss pieces against plain torch: T5X's z-loss on vocab-parallel logits, and T5's LR schedule."""

import math

import pytest
import torch

from tests.autograd_bytes import saved_bytes


@pytest.fixture(scope="module")
def parallel():
    from spactor_mega.parallel.state import single_process_parallel

    with single_process_parallel(seed=1):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_is_the_mean_squared_log_normaliser_and_differentiable(parallel, dtype):
    from spactor_mega.model.losses import sc_loss

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 2, 40, generator=gen)).to(dtype).requires_grad_()  # [s, b, V]
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    reference = logits.detach().double().requires_grad_()  # before sc_loss: its CE consumes fp32 logits
    ce, z = sc_loss(logits, labels, mask, z_loss=1e-2)
    lz = torch.logsumexp(reference, dim=-1).transpose(0, 1)  # [b, s]
    ref_ce = torch.nn.functional.cross_entropy(reference.transpose(0, 1).reshape(-1, 40), labels.reshape(-1),
                                               reduction="none").view(2, 5)
    expected_ce, expected_z = (ref_ce * mask).sum() / mask.sum(), 1e-2 * (lz.pow(2) * mask).sum() / mask.sum()
    assert z.item() == pytest.approx(expected_z.item(), rel=1e-6)
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-6)
    (ce + z).backward()
    (expected_ce + expected_z).backward()
    # fp32 exactly; bf16 gradients are the fp32 ones rounded to bf16
    torch.testing.assert_close(logits.grad.double(), reference.grad.to(dtype).double(),
                               atol=1e-6 if dtype == torch.float32 else 1e-4, rtol=0 if dtype == torch.float32 else 8e-3)
    _, off = sc_loss(logits.detach(), labels, mask)
    assert off is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_keeps_no_logits_sized_buffer_of_its_own(parallel, dtype):
    """The z-loss reuses the fp32 softmax Megatron's CE keeps: switching it on adds per-token values
    to what autograd saves, not another [s, b, V] buffer (it added two copies' worth before)."""
    from spactor_mega.model.losses import sc_loss

    s, b, vocab = 16, 4, 512
    labels, mask = torch.randint(0, vocab, (b, s)), torch.ones(b, s)

    def saved(z_loss: float) -> int:
        logits = torch.randn(s, b, vocab, dtype=dtype, requires_grad=True)
        return saved_bytes(lambda: sc_loss(logits * 1.0, labels, mask, z_loss=z_loss))

    logits_fp32_bytes = s * b * vocab * 4
    assert saved(0.0) >= logits_fp32_bytes  # CE's softmax
    assert saved(1e-4) - saved(0.0) < logits_fp32_bytes / 16


def test_constant_inverse_sqrt_is_t5s_schedule():
    """T5: lr(step) = 0.01 * sqrt(warmup / max(step, warmup)), i.e. 1/sqrt(max(step, 10^4)) at lr 0.01."""
    from spactor_mega.config import Config
    from spactor_mega.training.lr_schedule import build_lr_scheduler

    cfg = Config()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 0.01, 0.0, 100
    cfg.optim.lr_schedule = "constant-inverse-sqrt"
    cfg.train.steps = 10_000
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_lr_scheduler(optimizer, cfg)
    seen = {}
    for step in range(1, 1001):
        scheduler.step(increment=1)
        seen[step] = optimizer.param_groups[0]["lr"]
    for step in (1, 50, 100, 101, 400, 1000):
        assert seen[step] == pytest.approx(0.01 * math.sqrt(100 / max(step, 100)), rel=1e-9), step
