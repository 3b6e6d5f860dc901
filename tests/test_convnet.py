"""`batchnorm reproduce convnet`: the recipe transform, the network, the data pipeline, divergence,
the quick study end to end (real Fashion-MNIST), parallel runs, interruption, reports."""

import json
import math
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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from batchnorm import BatchNorm2d, data, runfiles
from batchnorm.cli import _networks, main
from batchnorm.experiments import convnet, runs
from batchnorm.experiments.study import run_one, run_study
from batchnorm.reporting import convnet as report
from tests.tolerances import TOL


@pytest.fixture(scope="module")
def fashion(data_root):
    return data.load("fashion-mnist", data_root / "fashion-mnist", download=False)


@pytest.fixture(scope="module")
def prepared(fashion):
    return convnet.EXPERIMENT.prepare(fashion, convnet.ConvnetConfig())  # the default validation


def records(run_dir: Path) -> list[dict]:
    return runfiles.read_records(run_dir)[0]


def run_of(out: Path, network: str) -> Path:
    """The one run folder of ``network`` in ``out`` (its name also carries lr, half-life, budget)."""
    (found,) = [p for p in out.glob(f"{network}_lr*_seed0") if p.is_dir()]
    return found


def quick(cfg: convnet.ConvnetConfig) -> convnet.ConvnetConfig:
    return convnet.EXPERIMENT.preset(cfg, "quick")


def strip_timing(records):
    """Timing fields (names ending in _s) are the only ones allowed to differ between two runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# -- the recipe and Sec. 4.2.1 -------------------------------------------------------------------

recipes = st.builds(
    convnet.Recipe,
    lr=st.floats(1e-4, 1.0),
    lr_half_life=st.floats(10.0, 1e5),
    momentum=st.floats(0.0, 0.99),
    weight_decay=st.floats(0.0, 1e-2),
    dropout=st.floats(0.0, 0.9),
    lrn=st.booleans(),
    shuffle=st.sampled_from(["examples", "batches"]),
    photometric=st.floats(0.0, 1.0),
    translate=st.integers(0, 4),
)


@given(recipe=recipes, factor=st.floats(0.5, 50.0))
@settings(max_examples=50, deadline=None)
def test_accelerate_makes_exactly_the_seven_changes(recipe, factor):
    fast = convnet.accelerate(recipe, factor)
    assert fast.lr == pytest.approx(recipe.lr * factor)  # 1. raise the learning rate
    assert fast.dropout == 0  # 2. remove Dropout
    assert fast.weight_decay == pytest.approx(recipe.weight_decay / 5)  # 3. L2 ÷ 5
    assert fast.lr_half_life == pytest.approx(recipe.lr_half_life / 6)  # 4. decay 6× faster
    assert fast.lrn is False  # 5. remove LRN
    assert fast.shuffle == "examples"  # 6. shuffle more thoroughly
    assert fast.photometric == pytest.approx(recipe.photometric / 2)  # 7. lighter distortions
    # and nothing else: the optimizer's momentum and the geometric distortions are kept
    assert (fast.momentum, fast.translate) == (recipe.momentum, recipe.translate)
    # the decay really is 6× faster: the fast recipe's lr ratio after t steps is the base's after 6t
    t = 1 + recipe.lr_half_life / 3
    assert fast.lr_at(t) / fast.lr == pytest.approx(recipe.lr_at(1 + 6 * (t - 1)) / recipe.lr)


def test_each_network_derives_its_recipe_from_the_base():
    base = convnet.Recipe()
    r = {n: net.recipe(base) for n, net in convnet.NETWORKS.items()}
    assert r["baseline"] == base and r["bn-baseline"] == base and r["baseline-sigmoid"] == base
    assert r["bn-x5"] == convnet.accelerate(base, 5) == r["bn-x5-sigmoid"]
    assert r["bn-x30"] == convnet.accelerate(base, 30)
    assert r["baseline-x5"] == replace(base, lr=5 * base.lr)  # "the same learning rate increase"
    assert r["bn-x30"].lr == pytest.approx(30 * base.lr)
    # the ablation: every change of BN-x5 but the faster decay
    assert r["bn-x5-slow-decay"] == replace(r["bn-x5"], lr_half_life=base.lr_half_life)
    assert tuple(n for n, net in convnet.NETWORKS.items() if not net.ablation) == convnet.STUDY
    assert set(convnet.NETWORKS) - set(convnet.STUDY) == {"bn-accelerated", "bn-x5-slow-decay"}
    assert r["bn-accelerated"] == convnet.accelerate(base, 1)  # the recipe; lr chosen by a study
    assert _networks(convnet.EXPERIMENT, "all") == list(
        convnet.STUDY
    )  # the paper's seven; the ablation by name
    assert _networks(convnet.EXPERIMENT, "bn-x5,bn-x5-slow-decay") == ["bn-x5", "bn-x5-slow-decay"]
    with pytest.raises(ValueError, match="decay_speedup must be a positive finite number"):
        convnet.accelerate(base, 5, decay_speedup=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network": "bn-x10"}, "network must be one of baseline, bn-baseline"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"batch_size": 1}, "batch_size must be an integer of at least 2"),
        ({"dataset": "imagenet"}, "dataset must be one of"),
        ({"test_examples": 0}, "test_examples must be a positive integer or None"),
        ({"width": 100}, r"width must be in \[0.25, 8\]"),
        ({"eps": 0}, r"eps must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(convnet.ConvnetConfig(), **change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": float("inf")}, "lr must be a positive finite number"),
        ({"lr_half_life": 0}, "lr_half_life must be a positive finite number"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"shuffle": "none"}, "shuffle must be"),
        ({"photometric": 2.0}, r"photometric must be in \[0, 1\]"),
        ({"translate": 1.5}, "translate must be an integer in 0..8"),
    ],
)
def test_bad_recipes_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(convnet.Recipe(), **change)


def test_quick_preset_shortens_the_run_and_its_decay():
    q = quick(convnet.ConvnetConfig(network="bn-x5"))
    assert (q.steps, q.eval_every, q.test_examples) == (600, 100, 2000)
    assert q.base.lr_half_life == 200 and q.recipe.lr_half_life == pytest.approx(200 / 6)


def test_evaluation_steps_are_dense_early_then_regular():
    cfg = replace(convnet.ConvnetConfig(), steps=3000, eval_every=400)
    steps = convnet.evaluation_steps(cfg)
    assert steps[:5] == [0, 100, 200, 300, 400] and 1600 in steps and 1700 not in steps
    assert steps[-3:] == [2400, 2800, 3000]
    assert steps == sorted(set(steps))


# -- the network ----------------------------------------------------------------------------------


def build(network, **kw):
    return convnet.build_network(replace(convnet.ConvnetConfig(), network=network, **kw))


def test_inception_modules_have_the_papers_four_branches():
    model = build("baseline")
    modules = [m for m in model.modules() if isinstance(m, convnet.Inception)]
    assert len(modules) == 4
    for m in modules:
        k3 = [c.kernel_size for c in m.b3.modules() if isinstance(c, nn.Conv2d)]
        k33 = [c.kernel_size for c in m.b33.modules() if isinstance(c, nn.Conv2d)]
        assert k3 == [(1, 1), (3, 3)] and k33 == [(1, 1), (3, 3), (3, 3)]  # 5×5 → two 3×3
    reduction = [m for m in modules if m.stride == 2]
    assert len(reduction) == 1 and reduction[0].b1 is None and reduction[0].proj is None
    assert all(m.b1 is not None and m.proj is not None for m in modules if m.stride == 1)
    # global average pooling, and no fully connected layer but the classifier
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules()) == 1
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [nn.Linear]


@pytest.mark.parametrize("network", list(convnet.NETWORKS))
@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 32)])
def test_every_network_maps_images_to_class_scores(network, channels, side):
    cfg = replace(convnet.ConvnetConfig(), network=network)
    model = convnet.build_network(cfg, in_channels=channels, classes=10)
    out = model(torch.randn(4, channels, side, side))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_bn_before_every_nonlinearity_and_the_recipe_switches():
    for name, net in convnet.NETWORKS.items():
        model = build(name)
        act = nn.ReLU if net.activation == "relu" else nn.Sigmoid
        other = nn.Sigmoid if act is nn.ReLU else nn.ReLU
        assert not any(isinstance(m, other) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        blocks = [
            m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[-1], act)
        ]
        assert len(blocks) == len(convs) == 29
        for block in blocks:
            if net.bn:  # Alg. 2: conv (no bias, Sec. 3.2) -> our BN -> nonlinearity
                assert [type(m) for m in block] == [nn.Conv2d, BatchNorm2d, act]
                assert block[0].bias is None
            else:
                assert [type(m) for m in block] == [nn.Conv2d, act]
        recipe = net.recipe(convnet.Recipe())
        lrn = sum(isinstance(m, convnet.LocalResponseNorm) for m in model.modules())
        assert lrn == (2 if recipe.lrn else 0)
        drop = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
        assert drop == ([recipe.dropout] if recipe.dropout else [])


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_local_response_norm_is_torchs(size, channels_last):
    x = torch.randn(4, 7, 5, 6, dtype=torch.float64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours = convnet.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=2.0)
    theirs = nn.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=2.0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), theirs(b)
    torch.testing.assert_close(ya, yb, **TOL[torch.float64])
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    assert repr(ours) == repr(theirs)


def test_every_network_of_a_seed_starts_from_the_same_convolutions():
    def conv_weights(model):
        return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]

    ref = conv_weights(build("baseline"))
    for name in convnet.NETWORKS:
        for a, b in zip(ref, conv_weights(build(name)), strict=True):
            assert torch.equal(a, b), name
    w = ref[5]  # He-normal: std sqrt(2 / fan_in)
    assert w.std().item() == pytest.approx(math.sqrt(2 / w[0].numel()), rel=0.1)
    assert not torch.equal(ref[0], conv_weights(build("baseline", seed=1))[0])


# -- data -----------------------------------------------------------------------------------------


def test_prepared_data_are_standardized(prepared, fashion):
    assert prepared.x_train.dtype == torch.uint8 and prepared.x_train.shape == (55000, 1, 28, 28)
    assert prepared.x_val.shape == (5000, 1, 28, 28)  # the last 5,000 training images
    assert torch.equal(prepared.y_val, fashion.train.labels[55_000:])
    assert prepared.x_val.is_contiguous(memory_format=torch.channels_last)
    assert prepared.mean.item() == pytest.approx(0.286, abs=1e-3)  # the README's train statistics
    assert prepared.std.item() == pytest.approx(0.353, abs=1e-3)
    assert prepared.x_test.is_contiguous(memory_format=torch.channels_last)
    assert abs(prepared.x_test.mean().item()) < 0.02  # the test set, with the train statistics


def shifted(img, dy, dx):
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def raw(prepared, idx):
    return prepared.x_train[idx].float() / 255


def test_translation_moves_each_image_by_at_most_the_recipe_pixels(prepared):
    idx = torch.arange(32)
    recipe = replace(convnet.Recipe(), photometric=0.0, translate=2)
    x = convnet.make_batch(prepared, idx, recipe, torch.Generator().manual_seed(1))
    x = x * prepared.std + prepared.mean  # back to [0, 1]
    moves = set()
    for i, img in enumerate(raw(prepared, idx)):
        match = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(x[i], shifted(img, dy, dx), atol=1e-6)
        ]
        assert match, f"image {i} is not a translate of its source by up to 2 pixels"
        moves.add(match[0])
    assert len(moves) > 5  # the shifts are random, per image


def test_photometric_distortion_keeps_the_pixel_order_and_lighter_is_lighter(prepared):
    idx = torch.arange(64)
    src = raw(prepared, idx)
    moved = {}
    for p in (0.4, 0.2):
        recipe = replace(convnet.Recipe(), photometric=p, translate=0)
        x = convnet.make_batch(prepared, idx, recipe, torch.Generator().manual_seed(7))
        x = x * prepared.std + prepared.mean
        assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
        for a, b in zip(src.flatten(1), x.flatten(1), strict=True):  # monotone per image
            order = a.argsort()
            assert (b[order].diff() >= -1e-5).all()
        moved[p] = (x - src).abs().mean().item()
    assert moved[0.2] < 0.7 * moved[0.4] and moved[0.2] > 0.01


def test_batches_are_a_function_of_the_generator_seed(prepared):
    idx = torch.arange(8)
    recipe = convnet.Recipe()
    a = convnet.make_batch(prepared, idx, recipe, torch.Generator().manual_seed(3))
    b = convnet.make_batch(prepared, idx, recipe, torch.Generator().manual_seed(3))
    c = convnet.make_batch(prepared, idx, recipe, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = convnet.make_batch(prepared, idx, recipe, None)  # no distortion at all
    torch.testing.assert_close(plain, (raw(prepared, idx) - prepared.mean) / prepared.std)


# -- divergence -----------------------------------------------------------------------------------

TINY = {
    "steps": 40,
    "eval_every": 20,
    "population_every": 20,
    "population_batches": 4,
    "test_examples": 500,
}


@pytest.mark.parametrize(("network", "lr"), [("baseline", 50.0), ("bn-x30", 100.0)])
def test_divergence_ends_the_run_cleanly_and_is_not_retried(prepared, tmp_path, network, lr):
    cfg = replace(convnet.ConvnetConfig(), network=network, **TINY)
    cfg = replace(cfg, base=replace(cfg.base, lr=lr))
    lines = []
    run_dir = run_one(
        convnet.EXPERIMENT, cfg, tmp_path / "run", prepared, progress=False, echo=lines.append
    )
    recs = records(run_dir)
    last = recs[-1]
    assert last["diverged"] and last["step"] < cfg.steps, last
    assert any("diverged at step" in line for line in lines)
    state = torch.load(run_dir / runfiles.CHECKPOINT, weights_only=True)
    assert state["stopped"]["step"] == last["step"]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    run_one(convnet.EXPERIMENT, cfg, run_dir, prepared, progress=False, echo=lines.append)
    assert "already complete (diverged at step" in lines[-1]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    (run_dir / runfiles.CHECKPOINT).unlink()  # kept without it (results/): still complete
    run_one(convnet.EXPERIMENT, cfg, run_dir, prepared, progress=False, echo=lines.append)
    assert lines[-1].endswith(f"diverged at step {last['step']}; kept without its checkpoint)")
    assert records(run_dir) == recs


def test_a_run_kept_without_its_checkpoint_is_complete_and_a_partial_one_trains_again(
    prepared, tmp_path
):
    """results/ keeps run folders without checkpoint.pt: a study continued on them (another
    session, another machine) takes the finished ones as they are and retrains the others."""
    cfg = replace(convnet.ConvnetConfig(), network="bn-baseline", **TINY)
    lines = []
    run_dir = run_one(
        convnet.EXPERIMENT, cfg, tmp_path / "run", prepared, progress=False, echo=lines.append
    )
    (run_dir / runfiles.CHECKPOINT).unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    run_one(convnet.EXPERIMENT, cfg, run_dir, prepared, progress=False, echo=lines.append)
    assert lines[-1].endswith("already complete (40 steps; kept without its checkpoint)")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # a partial run without its checkpoint cannot resume: it trains again, to the same metrics
    full = records(run_dir)
    path = run_dir / runfiles.METRICS
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    run_one(convnet.EXPERIMENT, cfg, run_dir, prepared, progress=False, echo=lines.append)
    assert "already complete" not in lines[-1]
    again = records(run_dir)
    drop = lambda recs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in recs]  # noqa: E731
    assert drop(again) == drop(full)


# -- the quick study, end to end ------------------------------------------------------------------

QUICK_NETWORKS = "baseline,bn-x5,baseline-x5"


@pytest.fixture(scope="module")
def quick_study(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    code = main(
        [
            "reproduce",
            "convnet",
            "--quick",
            "--networks",
            QUICK_NETWORKS,
            "--jobs",
            "2",
            "--data-dir",
            str(data_root / "fashion-mnist"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_quick_study_bn_x5_reaches_the_baseline_sooner_and_baseline_x5_fails(quick_study):
    out = quick_study
    study = report.load_study(out)
    assert study.networks == ["baseline", "bn-x5", "baseline-x5"]
    base = study.of("baseline")[0]
    target, base_step = base.best
    assert target > 0.7, "the quick Baseline learns"  # chance is 0.1
    fast = study.of("bn-x5")[0]
    reached = fast.first_step_at(target)
    assert reached is not None and reached < base_step, (reached, base_step)
    assert fast.best[0] > target
    # the control fails: it diverges, is stuck at chance, or (in this short run, whose learning
    # rate halves every 200 steps) ends far below the Baseline; the report says which
    control = study.of("baseline-x5")[0]
    assert control.diverged or control.at_chance or control.best[0] < target - report.FAR_BELOW, (
        control.records[-1]
    )
    claim = next(v for c, _, v in report.verdicts(study) if c.startswith("The Baseline at 5×"))
    assert claim == "reproduced" or claim.startswith("partly"), claim
    verdicts = {c: v for c, _, v in report.verdicts(study)}
    x5 = next(v for c, v in verdicts.items() if c.startswith("BN-x5 reaches"))
    assert x5 == "reproduced" or x5.startswith("partly (faster")


def test_quick_study_files(quick_study):
    out = quick_study
    run_dir = run_of(out, "bn-x5")
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["network"] == "bn-x5" and cfg["steps"] == 600
    assert cfg["recipe"]["lr"] == pytest.approx(0.1) and cfg["recipe"]["lrn"] is False
    env = json.loads((run_dir / "env.json").read_text())["sessions"]
    assert len(env) == 1 and env[0]["torch_threads"] == 1 and env[0]["git_revision"]
    recs = records(run_dir)
    steps = [r["step"] for r in recs]
    assert steps == convnet.evaluation_steps(quick(convnet.ConvnetConfig()))
    assert {k for k in recs[-1] if k.endswith("_s")} == {"eval_s", "train_s", "clock_s"}
    assert recs[-1]["test_acc_population"] > 0.7 and "test_acc_population" not in recs[1]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == len(recs) + 1 and "test_acc" in csv_lines[0]
    ckpt = torch.load(run_dir / runfiles.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 600 and ckpt["stopped"] is None
    model = convnet.build_network(quick(replace(convnet.ConvnetConfig(), network="bn-x5")))
    model.load_state_dict(ckpt["task"]["model"])  # the checkpoint is the network's state
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = events.Scalars("test_acc")
    assert [e.step for e in logged] == steps
    assert [e.value for e in logged] == pytest.approx([r["test_acc"] for r in recs])
    img = matplotlib.image.imread(out / "figure2.png")
    assert img.shape[0] > 500 and img.shape[1] > 1500 and img.std() > 0.05
    ET.parse(out / "figure2.svg")
    text = (out / "report.md").read_text()
    for needle in ("31.0M", "2.1M", "72.2%", "73.0%", "14.8×", "Santurkar", "A short run"):
        assert needle in text, needle
    assert "| BN-x5 reaches the Baseline's best accuracy in 14.8× fewer steps |" in text
    assert not list(out.rglob("*.part"))


def test_report_is_regenerated_from_the_files_alone(quick_study, tmp_path):
    out = quick_study
    before = (out / "report.md").read_text()
    for run_dir in out.iterdir():
        if run_dir.is_dir():
            (tmp_path / run_dir.name).mkdir()
            for name in ("config.json", "env.json", "metrics.jsonl"):
                (tmp_path / run_dir.name / name).write_bytes((run_dir / name).read_bytes())
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == before.replace(str(out), str(tmp_path))
    assert (tmp_path / "figure2.svg").read_bytes() == (out / "figure2.svg").read_bytes()


def test_parallel_and_sequential_runs_give_the_same_metrics(fashion, tmp_path):
    configs = [replace(convnet.ConvnetConfig(), network=n, **TINY) for n in ("bn-x5", "baseline")]
    run_study(convnet.EXPERIMENT, configs, tmp_path / "par", fashion, jobs=2, progress=False)
    run_study(convnet.EXPERIMENT, configs[:1], tmp_path / "seq", fashion, jobs=1, progress=False)
    name = convnet.run_name(configs[0])
    assert strip_timing(records(tmp_path / "par" / name)) == strip_timing(
        records(tmp_path / "seq" / name)
    )


# -- interruption, bad input ----------------------------------------------------------------------


def cli(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchnorm",
        "reproduce",
        "convnet",
        "--data-dir",
        str(data_root / "fashion-mnist"),
        "--out",
        str(out),
        "--steps",
        "160",
        "--eval-every",
        "40",
        "--test-examples",
        "500",
        "--no-progress",
        *extra,
    ]


ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def wait_for_records(
    out: Path, network: str, n: int, proc: subprocess.Popen, timeout: float = 180
) -> None:
    """Until the running study's run of ``network`` in ``out`` holds ``n`` records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob(f"{network}_lr*_seed0/metrics.jsonl"):
            if len(path.read_text().splitlines()) >= n:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} records of {network} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "jobs"), [(signal.SIGKILL, "1"), (signal.SIGINT, "2")], ids=["SIGKILL", "Ctrl-C-jobs2"]
)
def test_interrupted_study_resumes_to_the_same_metrics(sig, jobs, data_root, tmp_path):
    nets = ("--networks", "bn-x5,baseline", "--jobs", jobs)
    ref = subprocess.run(
        cli(tmp_path / "ref", data_root, *nets),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(out, data_root, *nets),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a job in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_records(out, "bn-x5", 6, proc)  # a few checkpoints in
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Run the same command to resume" in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    again = subprocess.run(
        cli(out, data_root, *nets), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    for network in ("bn-x5", "baseline"):
        run = run_of(out, network)
        expected = records(tmp_path / "ref" / run.name)
        assert strip_timing(records(run)) == strip_timing(expected), network
    sessions = json.loads((run_of(out, "bn-x5") / "env.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from_step"] > 0
    assert not list(out.rglob("*.part"))


def test_rerun_with_other_settings_is_refused_and_loses_nothing(prepared, fashion, tmp_path):
    cfg = replace(convnet.ConvnetConfig(), network="bn-x5", **TINY)
    run_study(convnet.EXPERIMENT, [cfg], tmp_path, fashion, progress=False)
    run_dir = tmp_path / convnet.run_name(cfg)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(runs.RunConfigMismatchError, match="steps: saved 40, now 60"):
        run_one(convnet.EXPERIMENT, replace(cfg, steps=60), run_dir, prepared, progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_cli_errors(tmp_path, capsys, monkeypatch, data_root):
    assert main(["reproduce", "convnet", "--networks", "bn-x10"]) == 2
    assert "--networks: unknown network(s) bn-x10" in capsys.readouterr().err
    assert main(["reproduce", "convnet", "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert main(["reproduce", "convnet", "--jobs", "0"]) == 2
    folder = str(data_root / "fashion-mnist")
    out = str(tmp_path / "s")
    assert (
        main(
            [
                "reproduce",
                "convnet",
                "--data-dir",
                folder,
                "--out",
                out,
                "--test-examples",
                "999999",
            ]
        )
        == 2
    )
    assert "--test-examples = 999999 exceeds the 10000 test images" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / "cache"))
    assert main(["reproduce", "convnet", "--no-download", "--out", str(tmp_path / "o")]) == 1
    assert "fashion-mnist: data set not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["report", str(tmp_path)]) == 2


NETWORKS = {n: (net.label, net.bn, net.activation) for n, net in convnet.NETWORKS.items()}


def fake_run(network: str, accs: dict[int, float], test_examples: int = 10_000, seed: int = 0):
    cfg = {
        **convnet.ConvnetConfig(network=network, seed=seed).to_dict(),
        "test_examples": test_examples,
    }
    records = [{"step": s, "test_acc": a} for s, a in sorted(accs.items())]
    label, bn, activation = NETWORKS[network]
    info = {"name": network, "label": label, "bn": bn, "activation": activation}
    return report.ConvRun(Path(network), "convnet", cfg, info, records)


def test_steps_to_the_baselines_best_strictly_and_within_its_sampling_error():
    base = fake_run("baseline", {0: 0.1, 1000: 0.85, 2000: 0.88, 4000: 0.90})
    # ends 0.05 points short of the Baseline's best: never strictly, but within 1 s.e. (0.30)
    x5 = fake_run("bn-x5", {0: 0.1, 500: 0.898, 1000: 0.8995})
    study = report.Study(Path("."), [base, x5], [], [])
    s = report.summarize(study, "bn-x5")
    assert s.to_target == [None] and s.factor == [None]
    se = report.standard_error(0.90, 10_000)
    assert se == pytest.approx(0.0030, abs=1e-4)
    # the Baseline itself first reaches 0.90 - se at step 4,000, BN-x5 at 500
    assert s.to_near == [500] and s.near_factor == [pytest.approx(8.0)]
    verdict = next(v for c, _, v in report.verdicts(study) if c.startswith("BN-x5 reaches"))
    assert verdict.startswith("partly (never strictly") and "8.0×" in verdict
    # on 1,000 test images the error is √10 larger, and 0.892 counts as "near" (not with 10,000)
    coarse = fake_run("bn-x5", {0: 0.1, 500: 0.892})
    base_coarse = fake_run("baseline", {0: 0.1, 1000: 0.85, 4000: 0.90}, test_examples=1000)
    s = report.summarize(report.Study(Path("."), [base_coarse, coarse], [], []), "bn-x5")
    assert s.to_near == [500]
    s = report.summarize(report.Study(Path("."), [base, coarse], [], []), "bn-x5")
    assert s.to_near == [None]
    # far below: neither
    slow = fake_run("bn-x5", {0: 0.1, 500: 0.80})
    s = report.summarize(report.Study(Path("."), [base, slow], [], []), "bn-x5")
    assert s.to_near == [None] and s.near_factor == [None]


def test_steps_to_lower_targets_table():
    # Baseline best 0.90: best − 1 pt (0.89) at 4,000, − 2 pt (0.88) at 2,000, − 4 pt (0.86) at 2,000
    base = fake_run("baseline", {0: 0.1, 1000: 0.85, 2000: 0.88, 3000: 0.885, 4000: 0.90})
    x5 = fake_run("bn-x5", {0: 0.1, 250: 0.87, 500: 0.885, 1000: 0.8895})
    sig = fake_run("bn-x5-sigmoid", {0: 0.1, 1000: 0.70})
    table = report._lower_targets_table(report.Study(Path("."), [base, x5, sig], [], []))
    rows = {line.split(" | ")[0]: line for line in table.splitlines()[2:]}
    assert rows["| best − 1 pt"] == "| best − 1 pt | 4,000 | never | never |"
    assert rows["| best − 2 pt"] == "| best − 2 pt | 2,000 | 500 (4.0×) | never |"
    assert rows["| best − 4 pt"] == "| best − 4 pt | 2,000 | 250 (8.0×) | never |"


def test_speedup_verdicts_state_the_shortfall_and_the_seeds():
    # per seed, the Baseline's best 0.90 at step 4,000; within 1 s.e. (0.897) at 4,000 too
    bases = [fake_run("baseline", {0: 0.1, 2000: 0.88, 4000: 0.90}, seed=s) for s in (0, 1)]

    def verdict(net: str, *accs: dict[int, float]) -> str:
        runs = [fake_run(net, a, seed=s) for s, a in enumerate(accs)]
        study = report.Study(Path("."), [*bases, *runs], [], [])
        return next(
            v for c, _, v in report.verdicts(study) if c.startswith(f"{NETWORKS[net][0]} reaches")
        )

    # every seed 2× faster: faster, but far under the paper's 14.8×
    assert verdict("bn-x5", {0: 0.1, 2000: 0.90}, {0: 0.1, 2000: 0.91}) == (
        "partly (faster, 2.0×, less than 1/1.5 of the paper's 14.8×)"
    )
    # every seed 10× faster: within 1/1.5 of 14.8×
    assert verdict("bn-x5", {0: 0.1, 400: 0.90}, {0: 0.1, 400: 0.91}) == "reproduced"
    # one seed strictly 4× faster, the other 0.002 short but within the sampling error, 8× sooner
    v = verdict("bn-x5", {0: 0.1, 1000: 0.90}, {0: 0.1, 500: 0.898})
    assert v.startswith("partly (4.0× faster in 1 of 2 seeds") and "less than 1/1.5" in v, v
    # one seed faster, the other far short: not reproduced, whatever the first seed did
    v = verdict("bn-x5", {0: 0.1, 400: 0.90}, {0: 0.1, 500: 0.85})
    assert v == "not reproduced (10.0× faster in 1 of 2 seeds)", v
    assert verdict("bn-x30", {0: 0.1, 500: 0.85}, {0: 0.1, 500: 0.86}) == (
        "not reproduced (never reaches the Baseline's best)"
    )


def test_bn_x30_starts_slower_measured_below_the_target_when_one_never_reaches_it():
    base = fake_run("baseline", {0: 0.1, 2000: 0.88, 3000: 0.89, 4000: 0.90})
    x5 = fake_run("bn-x5", {0: 0.1, 500: 0.89, 1000: 0.895})  # never 0.90; 0.89 at 500
    x30 = fake_run("bn-x30", {0: 0.1, 500: 0.85, 1500: 0.89})  # 0.89 at 1,500
    study = report.Study(Path("."), [base, x5, x30], [], [])
    measured, verdict = next((m, v) for c, m, v in report.verdicts(study) if "starts slower" in c)
    assert "BN-x5 500 steps, BN-x30 1,500" in measured
    assert verdict == "reproduced (1 point below the Baseline's best)"
    x30_fast = fake_run("bn-x30", {0: 0.1, 250: 0.89})
    study = report.Study(Path("."), [base, x5, x30_fast], [], [])
    verdict = next(v for c, _, v in report.verdicts(study) if "starts slower" in c)
    assert verdict == "not reproduced (1 point below the Baseline's best)"


def test_the_decay_ablation_is_reported_beside_bn_x5_only_when_it_ran():
    base = fake_run("baseline", {0: 0.1, 2000: 0.88, 4000: 0.90})
    x5 = fake_run("bn-x5", {0: 0.1, 1000: 0.89, 4000: 0.895})  # levels off short
    slow = fake_run("bn-x5-slow-decay", {0: 0.1, 1000: 0.89, 2000: 0.91})
    text = report._ablation_text(report.Study(Path("."), [base, x5, slow], [], []))
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| BN")}
    assert rows["| BN-x5"].startswith("| BN-x5 | never | never reaches it | 89.50% |"), rows
    assert rows["| BN-x5, Baseline's decay"].startswith(
        "| BN-x5, Baseline's decay | 2,000 | 2.0× | 91.00% |"
    ), rows
    assert report._ablation_text(report.Study(Path("."), [base, x5], [], [])) == ""
    # the figure 3 table lists it, with no paper numbers to put beside it
    table = report._figure3_table(report.Study(Path("."), [base, x5, slow], [], []))
    assert "| BN-x5, Baseline's decay | — | not in the paper (our ablation) | 2,000 |" in table


def test_wall_time_counts_parallel_runs_once_and_not_the_gaps_between_commands():
    def timed(network: str, seed: int, start: float, end: float):
        r = fake_run(network, {0: 0.1, 100: 0.5}, seed=seed)
        r.records[0]["clock_s"], r.records[-1]["clock_s"] = start, end
        return r

    # two runs side by side (0-600 s and 60-660 s), then, an hour later, one more (4,260-4,560 s)
    runs = [timed("baseline", 0, 0, 600), timed("bn-x5", 0, 60, 660), timed("bn-x5", 1, 4260, 4560)]
    text = report._timing_text(report.Study(Path("."), runs, [], []))
    assert "**16 minutes**" in text, text  # 660 + 300 s


def test_claims_survive_a_seed_without_a_baseline():
    base = fake_run("baseline", {0: 0.1, 2000: 0.88, 3000: 0.89, 4000: 0.90})
    x5 = fake_run("bn-x5", {0: 0.1, 500: 0.89, 1000: 0.895})
    x30 = fake_run("bn-x30", {0: 0.1, 1500: 0.89})
    orphan = fake_run("bn-x30", {0: 0.1, 100: 0.95}, seed=7)  # no Baseline of seed 7
    study = report.Study(Path("."), [base, x5, x30, orphan], [], [])
    verdict = next(v for c, _, v in report.verdicts(study) if "starts slower" in c)
    assert verdict == "reproduced (1 point below the Baseline's best)"


def test_a_bn_layer_that_skipped_non_finite_statistics_ends_the_run(prepared):
    """BN's guard counts batches whose statistics overflowed instead of writing them into the
    running statistics; the study reads that count (batchnorm.tools.nonfinite_skips) and stops."""
    from batchnorm.experiments.runs import Ranks

    task = convnet.ConvnetTask(replace(convnet.ConvnetConfig(network="bn-x5"), **TINY), prepared)
    assert task.train_step(1, Ranks()) is None
    layer = next(m for m in task.model.modules() if isinstance(m, BatchNorm2d))
    layer.nonfinite_skips += 1  # as the guard does when a batch's statistics are not finite
    assert task.train_step(2, Ranks()) == "a BN layer's batch statistics overflowed"
