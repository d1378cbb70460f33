"""The fp32 numerics a run sets where it starts: TF32 on CUDA (train.allow_tf32), flushed subnormals
on CPUs. The CUDA path is forced here (``cuda=True``): the flags are process-global and settable
without a GPU."""

import pytest
import torch

from spactor_mega.config import Config, ConfigError
from spactor_mega.plan.validate import validate
from spactor_mega.training.numerics import set_float_numerics


def flushes_subnormals() -> bool:
    return torch.tensor([1e-40]).item() == 0.0  # a float32 subnormal reads back as zero when flushed


@pytest.fixture
def restored_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, flushes_subnormals())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_flush_denormal(saved[2])


@pytest.mark.parametrize("allow", [True, False])
def test_cuda_runs_set_tf32_as_the_config_says(restored_flags, allow):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow
    set_float_numerics(cuda=True, allow_tf32=allow)
    assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow
    # both torch APIs still read it (a mix of the legacy and the per-backend API makes reads raise)
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if allow else "ieee")
    assert torch.get_float32_matmul_precision() == ("high" if allow else "highest")


def test_cpu_runs_flush_subnormals_and_leave_tf32_alone(restored_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_flush_denormal(False)
    assert not flushes_subnormals()
    set_float_numerics(cuda=False, allow_tf32=True)
    assert flushes_subnormals()
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_allow_tf32_defaults_on_and_must_be_a_bool():
    assert Config().train.allow_tf32 is True
    cfg = Config()
    cfg.train.allow_tf32 = "no"
    with pytest.raises(ConfigError, match=r"^train.allow_tf32 must be true or false, got 'no'$"):
        validate(cfg)
