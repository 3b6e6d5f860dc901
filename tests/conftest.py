import os
from pathlib import Path

import pytest
import torch

from batchnorm.functional import kernels, use_backend


def kernels_required() -> bool:
    return os.environ.get("BATCHNORM_KERNELS", "auto").lower() == "require"


# Every CPU backend must compute the same function; CUDA always uses "native". "fused" is tested
# whenever the kernels load, and always under BATCHNORM_KERNELS=require (CI), where a failed build
# must fail the tests; without a compiler the suite runs on the portable backends.
FUSED_TESTED = kernels_required() or kernels.available()
CPU_BACKENDS = ["fused", "python", "native"] if FUSED_TESTED else ["python", "native"]


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


# The real MNIST / Fashion-MNIST IDX files live in shared/data next to the repository checkout
# (see shared/data/*/README.md); BATCHNORM_TEST_DATA overrides. The project's code never hard-codes
# this path: tests pass it explicitly.
REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    return Path(os.environ.get("BATCHNORM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if not (root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        message = f"the real MNIST files are not in {root} (set BATCHNORM_TEST_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has them: their absence is a broken setup, not a skip
        pytest.skip(message)
    return root
