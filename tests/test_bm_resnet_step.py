"""benchmarks/bm_resnet_step.py runs end to end. No timing is checked (timings belong in
benchmarks/): what is checked is that the three networks ran and that ours and torch's BN gave the
same network (the same first loss from the same weights)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_run_prints_the_table(tmp_path):
    out = tmp_path / "table.md"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    script = REPO / "benchmarks" / "bm_resnet_step.py"
    args = [sys.executable, str(script), "--quick", "--threads", "1", "--markdown", str(out)]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("CPU: ") and "avx2" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 1 ")]
    assert len(rows) == 1
    row = [c.strip() for c in rows[0]]
    for ms in row[2:5]:  # ours, torch, no BN
        assert ms.endswith(" ms") and float(ms.removesuffix(" ms").strip("*")) > 0, row
    assert float(row[-1]) < 1e-4, row  # the first loss of ours and torch's
