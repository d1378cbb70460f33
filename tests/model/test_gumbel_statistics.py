"""Gumbel-max sampling draws from softmax(logits / T) over the allowed ids: a chi-square test over
many draws with fixed seeds, which the same draws fail against a wrong temperature, on a small
vocabulary (one noise block) and across the boundary of two noise blocks."""

import pytest
import torch


@pytest.fixture(scope="module")
def parallel():
    from spactor_mega.parallel.state import single_process_parallel

    with single_process_parallel(seed=1):
        yield


def _chi_square_p_value(samples: torch.Tensor, ids: list[int], probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``samples`` against ``probs`` over ``ids`` (every sample in ``ids``)."""
    observed = torch.stack([(samples == i).sum() for i in ids]).double()
    assert observed.sum() == samples.numel()
    expected = probs.double() * samples.numel()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(ids) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, chi2 / 2))  # survival function of chi2(len(ids) - 1)


def _draw(logits_row: torch.Tensor, rows: int, slots: int, temperature: float, **kwargs) -> torch.Tensor:
    from spactor_mega.model.generator import gumbel_max_sample

    logits = logits_row.expand(rows, slots, -1)
    return gumbel_max_sample(logits, temperature=temperature, row_seeds=[1000 + r for r in range(rows)], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_follow_softmax_at_the_temperature(parallel, dtype):
    logits = torch.tensor([3.0, 1.0, -0.5, 2.0, 0.25, -1.0, 1.5, 0.75, 0.0, 2.5]).to(dtype)
    temperature = 1.7
    samples = _draw(logits, 400, 250, temperature, sample_vocab_size=9, forbidden_ids=(0,))  # 100k draws
    allowed = list(range(1, 9))  # id 0 forbidden, id 9 >= sample_vocab_size
    assert torch.isin(samples, torch.tensor(allowed)).all()

    def probs(t):
        return torch.softmax(logits[allowed].double() / t, dim=-1)

    assert _chi_square_p_value(samples, allowed, probs(temperature)) > 1e-3
    for wrong in (temperature * 1.15, temperature / 1.15):
        assert _chi_square_p_value(samples, allowed, probs(wrong)) < 1e-9


def test_samples_follow_softmax_across_noise_blocks(parallel):
    from spactor_mega.model.generator import NOISE_BLOCK

    ids = [NOISE_BLOCK - 3, NOISE_BLOCK - 1, NOISE_BLOCK, NOISE_BLOCK + 2]
    logits = torch.full((NOISE_BLOCK + 500,), float("-inf"))
    logits[ids] = torch.tensor([0.5, 1.5, 1.0, 0.0])
    samples = _draw(logits, 40, 150, 0.8, sample_vocab_size=NOISE_BLOCK + 500)  # 6000 draws
    assert _chi_square_p_value(samples, ids, torch.softmax(logits[ids].double() / 0.8, dim=-1)) > 1e-3
    assert _chi_square_p_value(samples, ids, torch.softmax(logits[ids].double() / 1.2, dim=-1)) < 1e-6
