"""`batchnorm reproduce mnist`: the experiment's pieces, the quick run end to end, interruption, reports.

Everything runs on the real MNIST files (found as the library finds them, see conftest.py).
"""

import json
import os
import signal
import stat
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

from batchnorm import BatchNorm1d, data, runfiles
from batchnorm.cli import main
from batchnorm.experiments import mnist
from batchnorm.experiments.common import population_copy
from batchnorm.experiments.config import ConfigError
from batchnorm.experiments.runs import DataOrder, RunError
from batchnorm.experiments.study import run_one
from batchnorm.reporting import mnist as report


@pytest.fixture(scope="module")
def mnist_data(data_root):
    dataset = data.load("mnist", data_root / "mnist", download=False)
    return mnist.EXPERIMENT.prepare(dataset, mnist.MnistConfig())  # the default validation


def strip_timing(records):
    """Timing fields (names ending in _s) are the only ones allowed to differ between two runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def records(run_dir: Path) -> list[dict]:
    return runfiles.read_records(run_dir)[0]


# -- pieces ---------------------------------------------------------------------------------------


def test_binarized_inputs(mnist_data):
    x = mnist_data.x_train
    assert x.shape == (50000, 784) and x.dtype == torch.float32  # 10,000 held out
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert 0.10 < x.mean().item() < 0.20  # about 19% of the pixels are >= 128


def test_validation_split_is_the_last_training_images(data_root):
    ds = data.load("mnist", data_root / "mnist", download=False)
    d = mnist.prepare_data(ds, validation=10_000)
    assert d.x_train.shape == (50_000, 784) and d.x_val.shape == (10_000, 784)
    whole = mnist.prepare_data(ds)
    assert torch.equal(torch.cat([d.x_train, d.x_val]), whole.x_train)
    assert torch.equal(d.y_val, ds.train.labels[50_000:]) and torch.equal(d.x_test, whole.x_test)


def test_both_networks_start_from_the_same_weights():
    cfg = mnist.MnistConfig(init_std=0.03)
    plain = mnist.build_mlp(replace(cfg, network="plain"))
    bn = mnist.build_mlp(replace(cfg, network="bn"))
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
    other = mnist.build_mlp(replace(cfg, network="plain", seed=1))
    assert not torch.equal(other[0].weight, plain[0].weight)


def test_data_order_is_a_permutation_per_epoch_and_reproducible():
    order = DataOrder(600, 60, seed=5)
    epoch0 = torch.cat([order.indices(s) for s in range(1, 11)])
    epoch1 = torch.cat([order.indices(s) for s in range(11, 21)])
    assert sorted(epoch0.tolist()) == list(range(600)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    fresh = DataOrder(600, 60, seed=5)
    assert torch.equal(fresh.indices(17), order.indices(17))  # random access, as after a resume


def test_population_copy_is_algorithm_2(mnist_data):
    model = mnist.build_mlp(mnist.MnistConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(mnist_data.x_train[:600].split(60))
    pop = population_copy(model, batches)
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
    ("change", "field", "message"),
    [
        ({"steps": 0}, "steps", "must be a positive integer"),
        ({"batch_size": 1}, "batch_size", "must be an integer of at least 2"),
        ({"lr": -0.1}, "lr", "must be a positive finite number"),
        ({"init_std": float("nan")}, "init_std", "must be a positive finite number"),
        ({"probe_unit": 100}, "probe_unit", r"must be in \[0, 100\)"),
        ({"dataset": "cifar10"}, "dataset", "must be one of"),
        ({"threads": True}, "threads", "must be a positive integer, got True"),
        ({"bn_momentum": 1.5}, "bn_momentum", r"must be in \[0, 1\]"),
        ({"network": "resnet"}, "network", "must be one of plain, bn"),
    ],
)
def test_bad_settings_are_refused(change, field, message):
    with pytest.raises(ConfigError, match=message) as exc:
        replace(mnist.MnistConfig(), **change)
    assert exc.value.field == field and str(exc.value).startswith(f"MnistConfig: {field} ")


# -- the quick run, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    # --seeds 0: the quick preset's ad hoc pair at the default settings (plain --quick runs the study)
    args = ["reproduce", "mnist", "--quick", "--seeds", "0", "--data-dir", str(data_root / "mnist")]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return out


def _run_dirs(out: Path) -> dict[str, Path]:
    return {
        json.loads((p / "config.json").read_text())["network"]["name"]: p
        for p in out.iterdir()
        if (p / "config.json").is_file()
    }


def test_quick_run_learns_and_bn_wins(quick_run):
    dirs = _run_dirs(quick_run)
    assert set(dirs) == {"plain", "bn"}
    plain, bn = records(dirs["plain"]), records(dirs["bn"])
    assert [r["step"] for r in bn] == [r["step"] for r in plain] == list(range(0, 2001, 100))
    # the only fields that may differ between two runs of the same settings end in _s
    assert {k for k in bn[-1] if k.endswith("_s")} == {"eval_s", "train_s", "clock_s"}
    last_p, last_b = plain[-1], bn[-1]
    assert last_b["test_acc_population"] > 0.9, last_b  # chance is 0.1
    assert last_b["test_acc_population"] > last_p["test_acc"] + 0.02
    assert abs(last_b["test_acc_population"] - last_b["test_acc"]) < 0.02
    # BN's advantage holds at every evaluation after the first few hundred steps
    for rp, rb in zip(plain[3:], bn[3:], strict=True):
        assert rb["test_acc_population"] > rp["test_acc"], rb["step"]
    # Figure 1(b, c): the baseline's sigmoid inputs move more than the BN network's
    (pair,) = report.find_pairs(quick_run)
    s = report.summarize(pair)
    assert s.drift["plain"]["layer_median_range"] > 2 * s.drift["bn"]["layer_median_range"]


def test_quick_run_outputs_exist_and_parse(quick_run):
    out = quick_run
    run_dir = _run_dirs(out)["bn"]
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["experiment"] == "mnist" and doc["schema"] == runfiles.SCHEMA
    assert doc["network"] == {"name": "bn", "label": "with BN", "bn": True}
    assert doc["preset"] == "quick"
    assert doc["config"]["steps"] == 2000 and doc["config"]["lr"] == mnist.MnistConfig().lr
    assert doc["versions"]["torch"] == torch.__version__
    env = json.loads((run_dir / "env.json").read_text())["sessions"]
    assert len(env) == 1 and env[0]["seed"] == 0 and env[0]["git_revision"]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 22 and "test_acc_population" in csv_lines[0]
    recs = records(run_dir)
    ckpt = torch.load(run_dir / runfiles.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 2000 and set(ckpt["task"]) == {"model", "optimizer", "rng_torch"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = events.Scalars("test_acc_population")
    assert [e.step for e in logged] == [r["step"] for r in recs]
    assert [e.value for e in logged] == pytest.approx([r["test_acc_population"] for r in recs])
    pair_dir = out / "lr0.5_std0.01_eps1e-05_seed0"
    for path in (pair_dir / "figure1.png", pair_dir / "report.md", out / "report.md"):
        assert path.exists()
    img = matplotlib.image.imread(pair_dir / "figure1.png")
    assert img.shape[0] > 300 and img.shape[1] > 1000 and img.std() > 0.05
    ET.parse(pair_dir / "figure1.svg")
    sens = json.loads((run_dir / "population_batches.json").read_text())
    assert all(0.85 < a <= 1 for accs in sens["accuracy"].values() for a in accs)
    text = (out / "report.md").read_text()
    assert "| BN network ends with a higher test accuracy |" in text and "**reproduced**" in text
    assert "not comparable" in text  # a 2,000-step run is not put beside the 50K-step numbers
    assert "Santurkar" in text and not list(out.rglob("*.part"))
    assert not list(out.rglob(".lock")), "a finished run keeps no lock file"


def test_files_get_the_mode_a_plain_open_gives(quick_run):
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    for path in quick_run.rglob("*"):
        if path.is_file() and "tb" not in path.parts:  # TensorBoard writes its own files
            assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_report_is_regenerated_from_the_files_alone(quick_run, tmp_path):
    before = (quick_run / "report.md").read_text()
    copy = tmp_path / "copy"
    for name, run_dir in _run_dirs(quick_run).items():
        (copy / run_dir.name).mkdir(parents=True)
        keep = ["config.json", "env.json", "metrics.jsonl"]
        if name == "bn":
            keep.append("population_batches.json")
        for f in keep:
            (copy / run_dir.name / f).write_bytes((run_dir / f).read_bytes())
    (copy / "study.json").write_bytes((quick_run / "study.json").read_bytes())
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == before.replace(str(quick_run), str(copy))
    pair = copy / "lr0.5_std0.01_eps1e-05_seed0"
    assert (pair / "figure1.png").exists() and (pair / "figure1.svg").exists()


def test_report_of_one_network_s_folder_pairs_it_with_its_twin(quick_run, capsys):
    assert main(["report", str(_run_dirs(quick_run)["plain"])]) == 0
    assert "lr0.5_std0.01_eps1e-05_seed0/report.md" in capsys.readouterr().out


def test_report_of_an_empty_or_missing_folder_says_what_is_expected(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_schema_1_folders_are_read_as_two_runs(tmp_path):
    """A run folder of the format before the shared loop (both networks in one folder, keys
    ending in _plain/_bn) reads as the two runs of today's format."""
    folder = tmp_path / "old"
    folder.mkdir()
    cfg = {"steps": 100, "lr": 0.5, "init_std": 0.01, "eps": 1e-5, "momentum": 0.1, "seed": 0}
    (folder / "config.json").write_text(json.dumps({"config": cfg, "versions": {}}))
    rec = {
        "step": 100,
        "epoch": 0.1,
        "test_acc_plain": 0.5,
        "test_acc_bn_ema": 0.8,
        "test_acc_bn_population": 0.9,
        "unit_p50_plain": 0.1,
        "unit_p50_bn": 0.2,
        "eval_s": 1.0,
    }
    (folder / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    plain, bn = runfiles.read_runs(folder)
    assert plain.network["name"] == "plain" and bn.network["name"] == "bn"
    assert plain.records == [{"step": 100, "epoch": 0.1, "test_acc": 0.5, "unit_p50": 0.1}]
    assert bn.records[0]["test_acc"] == 0.8 and bn.records[0]["test_acc_population"] == 0.9
    assert bn.records[0]["eval_s"] == 1.0 and bn.config["bn_momentum"] == 0.1
    (pair,) = report.find_pairs(tmp_path, [plain, bn])
    assert pair.records[0]["test_acc_bn_population"] == 0.9  # and back, for the report


# -- interruption and resume --------------------------------------------------------------------------

SMALL = ["--steps", "500", "--eval-every", "50", "--population-batches", "10", "--no-progress"]


def cli(out: Path, data_root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchnorm",
        "reproduce",
        "mnist",
        "--networks",
        "bn",
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
NAME = mnist.run_name(mnist.MnistConfig())


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The small run of the resume tests, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ref = subprocess.run(cli(out, data_root), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    return out / NAME


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_run_resumes_to_the_same_metrics(sig, uninterrupted, data_root, tmp_path):
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
    wait_for_records(out / NAME, 4, proc)  # killed mid-run, after a few checkpoints
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Run the same command to resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = records(out / NAME)
    assert 4 <= len(partial) < 11, "the kill came too late to test anything"

    again = subprocess.run(
        cli(out, data_root), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "resuming at step" in again.stdout + again.stderr
    assert strip_timing(records(out / NAME)) == strip_timing(records(uninterrupted))
    a = torch.load(out / NAME / runfiles.CHECKPOINT, weights_only=True)
    b = torch.load(uninterrupted / runfiles.CHECKPOINT, weights_only=True)
    for k, v in a["task"]["model"].items():
        assert torch.equal(v, b["task"]["model"][k]), k
    sessions = json.loads((out / NAME / "env.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from_step"] > 0
    assert not list(out.rglob("*.part"))


def test_rerun_with_other_settings_is_refused_and_loses_nothing(data_root, tmp_path, capsys):
    args = [
        "reproduce",
        "mnist",
        "--networks",
        "bn",
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
    before = (tmp_path / NAME / "metrics.jsonl").read_bytes()
    assert main([*args[:-3], "--eval-every", "25", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "eval_every: saved 50, now 25" in err
    assert err.count("saved") == 1, "only the setting that differs is named"
    assert (tmp_path / NAME / "metrics.jsonl").read_bytes() == before
    assert main(args) == 0  # the same command again: already complete, nothing changes
    assert (tmp_path / NAME / "metrics.jsonl").read_bytes() == before


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
            with pytest.raises(RunError, match="in use by another process"):
                run_one(mnist.EXPERIMENT, cfg, run_dir, mnist_data, progress=False)
            assert not (run_dir / "metrics.jsonl").exists()
        finally:
            holder.kill()
    run_one(mnist.EXPERIMENT, cfg, run_dir, mnist_data, progress=False)  # the lock died with it
    assert len(records(run_dir)) == 2 and not (run_dir / ".lock").exists()


def test_damaged_checkpoint_is_reported_and_nothing_is_lost(data_root, tmp_path, capsys):
    args = [
        "reproduce",
        "mnist",
        "--networks",
        "bn",
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
    run_dir = tmp_path / NAME
    ckpt = run_dir / runfiles.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # damaged after it was written
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "cannot be read" in err and "Delete it" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_cli_errors_speak_in_flags(tmp_path, capsys, monkeypatch, data_root):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "mnist", "--lr", "fast"])
    assert exc.value.code == 2 and "expected a number, got 'fast'" in capsys.readouterr().err
    for args, message in (
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--batch-size", "1"], "--batch-size must be an integer of at least 2"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--jobs", "0"], "--jobs must be a positive integer"),
        (["--networks", "resnet"], "--networks: unknown network(s) resnet"),
        (["--seeds", "-1"], "seeds must be integers >= 0"),
    ):
        try:
            code = main(["reproduce", "mnist", *args])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
        assert code == 2, args
        err = capsys.readouterr().err
        assert message in err and "MnistConfig" not in err and "_size" not in err, err
    # sizes beyond the data: one line naming the flag (not a traceback), before any run starts
    real = ["reproduce", "mnist", "--data-dir", str(data_root / "mnist"), "--out"]
    assert main([*real, str(tmp_path / "s"), "--batch-size", "70000"]) == 2
    assert "--batch-size = 70000 exceeds the 50000 training images" in capsys.readouterr().err
    assert main([*real, str(tmp_path / "s"), "--population-batches", "100000"]) == 2
    assert "use at most 833" in capsys.readouterr().err
    assert main([*real, str(tmp_path / "s"), "--validation", "60000"]) == 2
    assert "--validation = 60000 leaves none" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # an --out that is a file, or that cannot be written (/proc refuses even root)
    (tmp_path / "f").write_text("")
    assert main([*real, str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*real, "/proc/batchnorm-test"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / "cache"))
    assert main(["reproduce", "mnist", "--no-download", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "data set not found" in err and str(tmp_path / "cache" / "data" / "mnist") in err
    assert not (tmp_path / "o").exists()


def test_lists_run_every_combination(data_root, tmp_path):
    from batchnorm.cli import _configs, build_parser

    args = build_parser().parse_args(
        ["reproduce", "mnist", "--lr", "0.1,1", "--init-std", "0.01,0.05", "--seeds", "0,1"]
    )
    cfgs = _configs(mnist.EXPERIMENT, args, 1, args.opts)
    assert len(cfgs) == 16 and len({mnist.run_name(c) for c in cfgs}) == 16
    assert {(c.lr, c.init_std) for c in cfgs} == {(0.1, 0.01), (0.1, 0.05), (1, 0.01), (1, 0.05)}


def test_the_base_install_runs_the_main_job_without_tensorboard(data_root, tmp_path):
    """tensorboard is an extra: without it the run says so once and writes everything else."""
    block = (
        "import sys; sys.modules['tensorboard'] = None; "  # as if it were not installed
        "from batchnorm.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["reproduce", "mnist", "--steps", "100", "--eval-every", "50", "--no-progress"]
    args += ["--data-dir", str(data_root / "mnist"), "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-c", block, *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("TensorBoard events off (pip install 'batchnorm[tensorboard]'") == 1
    assert (tmp_path / "report.md").exists() and not list(tmp_path.rglob("tb"))
