import contextlib
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


# The real data sets: found the way the library finds them (data.locate: $BATCHNORM_DATA, the
# OS package folders, the per-user cache; never a download), after $BATCHNORM_TEST_DATA (a folder
# with mnist/ and fashion-mnist/, for the tests alone; unset: the project machines' shared/data
# next to the checkout). Without them the tests that need them skip, and the run ends with one line
# saying how many and why; under CI (which has them) their absence fails instead.
REPO = Path(__file__).resolve().parents[1]
REAL_DATA = ("mnist", "fashion-mnist")
_skipped: list[str] = []


def _find_real_data(name: str) -> tuple[Path | None, str]:
    """The folder holding data set ``name``, or None and where the search looked."""
    from batchnorm import data

    spec = data.DATASETS[name]
    looked = []
    root = os.environ.get("BATCHNORM_TEST_DATA") or REPO.parent / "shared" / "data"
    with contextlib.suppress(data.DataError):
        return data.locate(spec, Path(root) / name, download=False), ""
    looked.append(str(Path(root) / name))
    try:
        return data.locate(spec, None, download=False), ""
    except data.DataError:
        looked.append(f"${data.ENV_VAR}, the OS package folders, the cache")
    return None, "; ".join(looked)


class RealData:
    """``data_root / "mnist"``: the folder of that data set, or a skip (a failure under CI)."""

    def __truediv__(self, name: str) -> Path:
        folder, looked = _find_real_data(name)
        if folder is None:
            message = f"the real {name} files were not found (looked in {looked})"
            if os.environ.get("CI"):
                pytest.fail(message)  # CI has them: their absence is a broken setup, not a skip
            _skipped.append(name)
            pytest.skip(message)
        return folder


@pytest.fixture(scope="session")
def data_root() -> RealData:
    return RealData()


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        names = ", ".join(sorted(set(_skipped)))
        terminalreporter.write_line(
            f"{len(_skipped)} test(s) that need the real data sets skipped: {names} not found. "
            f"Put the files where the library looks ($BATCHNORM_DATA=<folder with mnist/ and "
            "fashion-mnist/>, or the cache), or set BATCHNORM_TEST_DATA.",
            yellow=True,
        )
