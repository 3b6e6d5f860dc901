import os

import pytest
import torch

from batchnorm.functional import kernels, use_backend

# Every CPU backend must compute the same function; CUDA always uses "native".
CPU_BACKENDS = ["fused", "python", "native"]


def pytest_report_header(config):
    return [f"torch {torch.__version__}, threads {torch.get_num_threads()}", kernels.status()]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def threads(request):
    """Run a test at a given intra-op thread count, restoring the old one."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def kernels_required() -> bool:
    return os.environ.get("BATCHNORM_KERNELS", "auto").lower() == "require"
