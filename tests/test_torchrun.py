"""The experiments under real ``torchrun`` (issue #6, part 3): 2 gloo processes on the CPU.

What must hold: with synchronized BN statistics a 2-process MNIST run is the single-process run
(same global batch and data order, the loss scaled so DDP's average is the global mean), even
after the processes are killed mid-run and the same command resumes them; with per-rank
statistics the BN network changes and the network without BN does not; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchnorm import runfiles
from batchnorm.cli import main

TIMEOUT = 300  # seconds for one torchrun; a hang fails the test instead of stalling CI
ARGS = ["--steps", "1000", "--eval-every", "100", "--population-batches", "10", "--no-progress"]
RUN = "lr0.5_std0.01_eps1e-05_seed0"  # plain_<RUN> and bn_<RUN>


def torchrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.Popen(
        [*cmd, "-m", "batchnorm", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once: a machine that lost power, mid-step."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s")
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def runs_dir(data_root, tmp_path_factory) -> Path:
    """One single-process run, one 2-process sync run killed mid-way and resumed, one per-rank."""
    root = tmp_path_factory.mktemp("torchrun")
    data = ["--data-dir", str(data_root / "mnist")]
    assert main(["reproduce", "mnist", *ARGS, *data, "--out", str(root / "single")]) == 0

    sync = ["reproduce", "mnist", *ARGS, *data, "--out", str(root / "sync")]
    proc = torchrun(sync, root)
    metrics = root / "sync" / f"bn_{RUN}" / "metrics.jsonl"  # the second run, with SyncBN
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    kill_all(proc)
    killed_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert killed_at < 1000, "the run ended before it could be interrupted"
    out = finish(torchrun(sync, root))
    resumed = re.search(r"resuming at step (\d+) of 1000", out)
    assert resumed and killed_at <= int(resumed[1]) < 1000, out  # from the last checkpoint

    per_rank = ["reproduce", "mnist", *ARGS, *data, "--bn", "per-rank"]
    finish(torchrun([*per_rank, "--out", str(root / "per-rank")], root))
    return root


def records(folder: Path, net: str) -> list[dict]:
    return runfiles.read_records(folder / f"{net}_{RUN}")[0]


def test_sync_bn_on_two_processes_is_the_single_process_run_even_after_a_kill(runs_dir):
    for net, keys in (
        ("plain", ("test_acc",)),
        ("bn", ("test_acc", "test_acc_population")),
    ):
        one, two = records(runs_dir / "single", net), records(runs_dir / "sync", net)
        assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(0, 1001, 100))
        for a, b in zip(one, two, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], abs=2e-3), (net, a["step"], key)
            for key in ("train_loss", "test_loss"):
                if a[key] is not None:
                    assert b[key] == pytest.approx(a[key], rel=1e-3), (net, a["step"], key)
    bn_dir = runs_dir / "sync" / f"bn_{RUN}"
    cfg = json.loads((bn_dir / "config.json").read_text())["config"]
    assert cfg["processes"] == 2 and cfg["bn_sync"] is True
    single = json.loads((runs_dir / "single" / f"bn_{RUN}" / "config.json").read_text())
    assert "processes" not in single["config"]  # single-process configs leave it out
    sessions = json.loads((bn_dir / "env.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from_step"] > 0  # rank 0 only, twice


def test_per_rank_statistics_change_the_bn_network_only(runs_dir):
    sync, per_rank = records(runs_dir / "sync", "plain"), records(runs_dir / "per-rank", "plain")
    for a, b in zip(sync, per_rank, strict=True):
        if a["train_loss"] is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # each process normalizes its 30 examples instead of the 60: a different network
    sync, per_rank = records(runs_dir / "sync", "bn"), records(runs_dir / "per-rank", "bn")
    diffs = [
        abs(a["train_loss"] - b["train_loss"])
        for a, b in zip(sync, per_rank, strict=True)
        if a["train_loss"] is not None
    ]
    assert max(diffs) > 1e-3
    assert per_rank[-1]["test_acc_population"] > 0.85  # and it still learns
    cfg = json.loads((runs_dir / "per-rank" / f"bn_{RUN}" / "config.json").read_text())
    assert cfg["config"]["bn_sync"] is False


def test_a_resume_with_another_process_count_is_refused(runs_dir, data_root):
    code = main(
        [
            "reproduce",
            "mnist",
            *ARGS,
            "--data-dir",
            str(data_root / "mnist"),
            "--out",
            str(runs_dir / "sync"),
        ]
    )
    assert code == 1  # config mismatch: processes 2 saved, 1 now


def test_convnet_with_sync_bn_on_two_processes_follows_the_single_process_run(data_root, tmp_path):
    """BN-x5 (no Dropout): the same global batches, augmented alike, and the same SyncBN
    normalization, so 2 processes track 1 to float32 rounding over the first steps."""
    args = ["reproduce", "convnet", "--quick", "--networks", "bn-x5", "--steps", "4"]
    args += ["--eval-every", "4", "--test-examples", "1000", "--no-progress"]
    args += ["--data-dir", str(data_root / "fashion-mnist")]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finish(torchrun([*args, "--out", str(tmp_path / "two")], tmp_path))
    (name,) = [p.name for p in (tmp_path / "one").glob("bn-x5_*") if p.is_dir()]
    one = runfiles.read_records(tmp_path / "one" / name)[0]
    two = runfiles.read_records(tmp_path / "two" / name)[0]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3, 4]
    for a, b in zip(one[1:], two[1:], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), a["step"]
        assert b["train_acc"] == a["train_acc"]
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3), a["step"]
