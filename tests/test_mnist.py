"""`batchnorm reproduce mnist`: the experiment's pieces, the quick run end to end, interruption, reports.

Everything runs on the real MNIST files (shared/data/mnist, see conftest.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, data
from batchnorm.cli import main
from batchnorm.experiments import mnist
from batchnorm.reporting import mnist as report


@pytest.fixture(scope="module")
def mnist_data(data_root):
    return mnist.prepare_data(data.load("mnist", data_root / "mnist", download=False))


def strip_timing(records):
    """Timing fields (names ending in _s) are the only ones allowed to differ between two runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# -- pieces ---------------------------------------------------------------------------------------


def test_binarized_inputs(mnist_data):
    x = mnist_data.x_train
    assert x.shape == (60000, 784) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert 0.10 < x.mean().item() < 0.20  # about 19% of the pixels are >= 128


def test_both_networks_start_from_the_same_weights():
    cfg = mnist.MnistConfig(init_std=0.03)
    plain, bn = mnist.build_mlp(cfg, bn=False), mnist.build_mlp(cfg, bn=True)
    lin_p = [m for m in plain if isinstance(m, nn.Linear)]
    lin_b = [m for m in bn if isinstance(m, nn.Linear)]
    assert [m.weight.shape for m in lin_p] == [(100, 784), (100, 100), (100, 100), (10, 100)]
    for a, b in zip(lin_p, lin_b, strict=True):
        assert torch.equal(a.weight, b.weight)
    assert all(m.bias is None for m in lin_b[:-1]) and lin_b[-1].bias is not None
    assert sum(isinstance(m, BatchNorm1d) for m in bn) == 3
    assert sum(isinstance(m, nn.Sigmoid) for m in plain) == 3
    w = torch.cat([m.weight.flatten() for m in lin_p])
    assert w.std().item() == pytest.approx(0.03, rel=0.02) and abs(w.mean().item()) < 1e-3
    other = mnist.build_mlp(replace(cfg, seed=1), bn=False)
    assert not torch.equal(other[0].weight, plain[0].weight)


def test_data_order_is_a_permutation_per_epoch_and_reproducible():
    order = mnist.DataOrder(600, 60, seed=5)
    epoch0 = torch.cat([order.indices(s) for s in range(1, 11)])
    epoch1 = torch.cat([order.indices(s) for s in range(11, 21)])
    assert sorted(epoch0.tolist()) == list(range(600)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    fresh = mnist.DataOrder(600, 60, seed=5)
    assert torch.equal(fresh.indices(17), order.indices(17))  # random access, as after a resume


def test_population_copy_is_algorithm_2(mnist_data):
    cfg = mnist.MnistConfig()
    model = mnist.build_mlp(cfg, bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(mnist_data.x_train[:600].split(60))
    pop = mnist.population_copy(model, batches)
    assert not pop.training and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the original model changed: {k}"
    # The first BN layer sees W·x of each batch: E[x] = mean of the batch means, Var[x] =
    # m/(m-1) · mean of the biased batch variances (Alg. 2, lines 9-10), in float64.
    with torch.no_grad():
        z = [(model[0](b)).double() for b in batches]
    mean = torch.stack([t.mean(0) for t in z]).mean(0)
    var = torch.stack([t.var(0, unbiased=False) for t in z]).mean(0) * 60 / 59
    torch.testing.assert_close(pop[1].running_mean.double(), mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pop[1].running_var.double(), var, rtol=1e-5, atol=1e-9)
    assert pop[1].population.batches == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"batch_size": 1}, "batch_size must be at least 2"),
        ({"lr": -0.1}, "lr must be a positive finite number"),
        ({"init_std": float("nan")}, "init_std must be a positive finite number"),
        ({"probe_unit": 100}, r"probe_unit must be in \[0, 100\)"),
        ({"dataset": "cifar10"}, "dataset must be one of"),
    ],
)
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(mnist.MnistConfig(), **change)


# -- the quick run, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    start = time.perf_counter()
    code = main(
        [
            "reproduce",
            "mnist",
            "--quick",
            "--data-dir",
            str(data_root / "mnist"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out, time.perf_counter() - start


def test_quick_run_learns_and_bn_wins(quick_run):
    out, seconds = quick_run
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    recs = mnist.load_records(run_dir)
    assert [r["step"] for r in recs] == list(range(0, 2001, 100))
    # the only fields that may differ between two runs of the same settings end in _s
    assert {k for k in recs[-1] if k.endswith("_s")} == {"eval_s", "train_plain_s", "train_bn_s"}
    assert not [k for k in recs[-1] if "_s_" in k]
    last = recs[-1]
    assert last["test_acc_bn_population"] > 0.9, last  # chance is 0.1
    assert last["test_acc_bn_population"] > last["test_acc_plain"] + 0.02, last
    assert abs(last["test_acc_bn_population"] - last["test_acc_bn_ema"]) < 0.02
    # BN's advantage holds at every evaluation after the first few hundred steps
    for r in recs[3:]:
        assert r["test_acc_bn_population"] > r["test_acc_plain"], r["step"]
    # Figure 1(b, c): the baseline's sigmoid inputs move more than the BN network's
    s = report.summarize(report.load_run(run_dir))
    assert s.drift["plain"]["layer_median_range"] > 2 * s.drift["bn"]["layer_median_range"]
    assert seconds < 150, f"the quick run took {seconds:.0f} s"


def test_quick_run_outputs_exist_and_parse(quick_run):
    out, _ = quick_run
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["steps"] == 2000 and cfg["config"]["lr"] == mnist.MnistConfig().lr
    assert cfg["versions"]["torch"] == torch.__version__
    env = json.loads((run_dir / "env.json").read_text())["sessions"]
    assert len(env) == 1 and env[0]["seed"] == 0 and env[0]["git_revision"]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 22 and "test_acc_bn_population" in csv_lines[0]
    recs = mnist.load_records(run_dir)
    ckpt = torch.load(run_dir / mnist.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 2000 and set(ckpt["models"]) == {"plain", "bn"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = events.Scalars("test_acc_bn_population")
    assert [e.step for e in logged] == [r["step"] for r in recs]
    assert [e.value for e in logged] == pytest.approx([r["test_acc_bn_population"] for r in recs])
    for png in (run_dir / "figure1.png", out / "report.md"):
        assert png.exists()
    img = matplotlib.image.imread(run_dir / "figure1.png")
    assert img.shape[0] > 300 and img.shape[1] > 1000 and img.std() > 0.05
    ET.parse(run_dir / "figure1.svg")
    sens = json.loads((run_dir / "population_batches.json").read_text())
    assert all(0.85 < a <= 1 for accs in sens["accuracy"].values() for a in accs)
    text = (out / "report.md").read_text()
    assert "| BN network ends with a higher test accuracy |" in text and "**reproduced**" in text
    assert "not comparable" in text  # a 2,000-step run is not put beside the 50K-step numbers
    assert "Santurkar" in text and not list(out.rglob("*.part"))


def test_report_is_regenerated_from_the_files_alone(quick_run, tmp_path):
    out, _ = quick_run
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    before = (run_dir / "report.md").read_text()
    copy = tmp_path / run_dir.name
    copy.mkdir()
    for name in ("config.json", "env.json", "metrics.jsonl", "population_batches.json"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == before.replace(str(run_dir), str(copy))
    assert (copy / "figure1.png").exists() and (copy / "figure1.svg").exists()


def test_report_of_an_empty_folder_says_what_is_expected(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "holds no run" in capsys.readouterr().err


# -- interruption and resume --------------------------------------------------------------------------

SMALL = ["--steps", "500", "--eval-every", "50", "--population-batches", "10", "--no-progress"]


def cli(out: Path, data_root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchnorm",
        "reproduce",
        "mnist",
        "--data-dir",
        str(data_root / "mnist"),
        "--out",
        str(out),
        *SMALL,
    ]


def wait_for_records(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} records after {timeout} s")


ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The small run of the resume tests, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ref = subprocess.run(cli(out, data_root), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    return out / mnist.run_name(mnist.MnistConfig())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_run_resumes_to_the_same_metrics(sig, uninterrupted, data_root, tmp_path):
    name = uninterrupted.name
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(out, data_root),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a shell running pytest in the background ignores SIGINT, and children
        # inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_records(out / name, 4, proc)  # killed mid-run, after a few checkpoints
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Run the same command to resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = mnist.load_records(out / name)
    assert 4 <= len(partial) < 11, "the kill came too late to test anything"

    again = subprocess.run(
        cli(out, data_root), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "resuming at step" in again.stdout + again.stderr
    assert strip_timing(mnist.load_records(out / name)) == strip_timing(
        mnist.load_records(uninterrupted)
    )
    a = torch.load(out / name / mnist.CHECKPOINT, weights_only=True)
    b = torch.load(uninterrupted / mnist.CHECKPOINT, weights_only=True)
    for net in ("plain", "bn"):
        for k, v in a["models"][net].items():
            assert torch.equal(v, b["models"][net][k]), (net, k)
    sessions = json.loads((out / name / "env.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from_step"] > 0
    assert not list(out.rglob("*.part"))


def test_rerun_with_other_settings_is_refused_and_loses_nothing(data_root, tmp_path, capsys):
    args = [
        "reproduce",
        "mnist",
        "--data-dir",
        str(data_root / "mnist"),
        "--out",
        str(tmp_path),
        "--steps",
        "100",
        "--eval-every",
        "50",
        "--no-progress",
    ]
    assert main(args) == 0
    name = mnist.run_name(replace(mnist.MnistConfig(), steps=100))
    before = (tmp_path / name / "metrics.jsonl").read_bytes()
    assert main([*args[:-3], "--eval-every", "25", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "eval_every: saved 50, now 25" in err
    assert (tmp_path / name / "metrics.jsonl").read_bytes() == before
    assert main(args) == 0  # the same command again: already complete, nothing changes
    assert (tmp_path / name / "metrics.jsonl").read_bytes() == before


def test_a_run_folder_in_use_is_refused(tmp_path, mnist_data):
    cfg = replace(mnist.MnistConfig(), steps=30, eval_every=30)
    run_dir = tmp_path / mnist.run_name(cfg)
    run_dir.mkdir()
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    )
    cmd = [sys.executable, "-c", hold, str(run_dir / ".lock")]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(mnist.RunError, match="in use by another process"):
                mnist.run(cfg, run_dir, mnist_data, progress=False)
            assert not (run_dir / "metrics.jsonl").exists()
        finally:
            holder.kill()
    mnist.run(cfg, run_dir, mnist_data, progress=False)  # the lock died with its holder
    assert len(mnist.load_records(run_dir)) == 2


def test_damaged_checkpoint_is_reported_and_nothing_is_lost(data_root, tmp_path, capsys):
    args = [
        "reproduce",
        "mnist",
        "--data-dir",
        str(data_root / "mnist"),
        "--out",
        str(tmp_path),
        "--steps",
        "60",
        "--eval-every",
        "30",
        "--no-progress",
    ]
    assert main(args) == 0
    run_dir = tmp_path / mnist.run_name(replace(mnist.MnistConfig(), steps=60, eval_every=30))
    ckpt = run_dir / mnist.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # damaged after it was written
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "cannot be read" in err and "Delete it" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_cli_errors(tmp_path, capsys, monkeypatch, data_root):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "mnist", "--lr", "fast"])
    assert exc.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err
    assert main(["reproduce", "mnist", "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    # sizes beyond the data: one line naming the setting (not a traceback), before any run starts
    real = [
        "reproduce",
        "mnist",
        "--data-dir",
        str(data_root / "mnist"),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*real, "--batch-size", "70000"]) == 2
    assert "batch_size = 70000 exceeds the 60000 training images" in capsys.readouterr().err
    assert main([*real, "--population-batches", "100000"]) == 2
    assert "use population_batches ≤ 1000" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / "cache"))
    assert main(["reproduce", "mnist", "--no-download", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "data set not found" in err and str(tmp_path / "cache" / "data" / "mnist") in err
    assert not (tmp_path / "o").exists()


def test_sweep_lists_every_combination():
    cfgs = mnist.sweep(mnist.MnistConfig(), lrs=[0.1, 1.0], seeds=[0, 1, 2])
    assert [(c.lr, c.seed) for c in cfgs] == [
        (0.1, 0),
        (0.1, 1),
        (0.1, 2),
        (1.0, 0),
        (1.0, 1),
        (1.0, 2),
    ]
    assert len({mnist.run_name(c) for c in cfgs}) == 6
