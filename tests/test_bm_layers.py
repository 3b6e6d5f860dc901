"""benchmarks/bm_layers.py runs end to end. No timing is checked (timings belong in benchmarks/);
what is checked is what the run establishes besides them: every variant ran, our module compiled
in one graph (``fullgraph=True``) without recompiling while timed, and each variant's gradients
matched float64."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.functional import kernels

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not kernels.available(), reason="fused kernels unavailable"),
]


def test_quick_run_prints_the_table(tmp_path):
    out = tmp_path / "table.md"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    args = [
        "--quick",
        "--rounds",
        "1",
        "--budget",
        "0.001",
        "--threads",
        "1",
        "--markdown",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bm_layers.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    table = out.read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    shapes = [r for r in rows if len(r) == 14 and r[0].strip() != "group"]
    assert {r[0].strip() for r in shapes} == {"NCHW", "channels_last", "2-D/1-D", "3-D"}
    assert len(shapes) == 5
    for r in shapes:
        for ms in r[4:8]:  # torch eager, torch compiled, ours eager, ours compiled
            assert float(ms) > 0, r
        assert r[-1].strip() == "", (
            r
        )  # notes: a failed fullgraph, a recompile, a gradient off float64
    means = [r for r in rows if len(r) == 7 and r[0].strip() != "group"]
    assert [r[0].strip() for r in means] == ["NCHW", "channels_last", "2-D/1-D", "3-D"]
