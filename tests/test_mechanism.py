"""The mechanism study (experiments/mechanism, reporting/mechanism): the quick protocol end to end
on real MNIST; the instruments leave training bitwise alone and an interrupted noisy-BN run
resumes exactly; the registered rules on runs with known numbers."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
import torch

from batchnorm import data, runfiles
from batchnorm.cli import main
from batchnorm.experiments import mechanism
from batchnorm.experiments.mechanism.protocol import RULES, STUDY_BASE, protocol
from batchnorm.experiments.study import run_one
from batchnorm.reporting import mechanism as report


@pytest.fixture(scope="module")
def quick_study(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mechanism")
    args = ["reproduce", "mechanism", "--quick", "--jobs", "2", "--no-progress"]
    assert main([*args, "--data-dir", str(data_root / "mnist"), "--out", str(out)]) == 0
    return out


def test_quick_study_runs_every_arm_with_the_instruments(quick_study):
    doc = runfiles.read_study(quick_study)
    assert doc["protocol"]["name"] == "mechanism-v4-quick"
    grid = doc["protocol"]["grid"]
    lrs = {f"lr:{a}:{lr:g}" for a in ("plain", "bn") for lr in (0.2, 1, 5, 50)}
    depth = {f"depth:{d}:{a}:{lr:g}" for d in (3, 10) for a in ("plain", "bn") for lr in (0.5, 2)}
    later = {"dropout:plain:0", "dropout:plain:0.5", "dropout:bn:0", "dropout:bn:0.5",
             "batch:ghost:4", "batch:ghost:60", "batch:renorm:4"}  # fmt: skip
    scale = {f"scale:10:{a}" for a in ("scaled", *report.TWINS)}
    assert set(grid) == {f"fig1:{a}" for a in report.ARMS} | lrs | depth | later | scale
    # the cells that are part 1's runs train once
    assert grid["lr:bn:1"] == grid["fig1:bn"] == grid["dropout:bn:0"] == grid["batch:ghost:60"]
    assert "winners" in doc and doc["winners"] == {}  # nothing is selected
    runs = {r.path.name: r for r in runfiles.find_runs(quick_study)}
    noisy = runs[doc["protocol"]["grid"]["fig1:noisy-strong"][0]]
    assert (noisy.config["noise_scale"], noisy.config["noise_shift"]) == (3.0, 2.0)
    assert len(runs) == 10 + 8 + 4 + 4
    deep = runs[grid["depth:10:bn:0.5"][0]].config
    assert (deep["init"], len(deep["hidden"]), deep["instruments"]) == ("glorot", 10, False)
    assert runs[grid["dropout:plain:0.5"][0]].config["dropout"] == 0.5
    renorm = runs[grid["batch:renorm:4"][0]]
    assert (renorm.config["network"], renorm.config["virtual_batch"]) == ("renorm", 4)
    assert renorm.network["renorm"] == {"r_max": 3.0, "d_max": 5.0, "warmup": 500}
    for run in runs.values():
        assert all(0 <= r["train_acc"] <= 1 for r in run.records if "test_acc" in r)
        if run.records[-1].get("diverged"):
            continue
        readings = [r for r in run.records if "ics_rel" in r]
        if not run.config["instruments"]:
            assert readings == []  # parts 3-5 read accuracies only
            continue
        assert [r["step"] for r in readings] == list(range(0, 1500, 100))
        assert all(len(r["ics_rel"]) == 3 and r["beta"] > 0 for r in readings)
        layers = run.extra["shift"]["layers"]
        assert len(layers) == 3  # every hidden sigmoid's input
        assert all(v["std_trained"]["start"] == 100 for v in layers.values())
    # noisy BN's inputs move more than BN's: the instrument sees the noise (training mode)
    bn = runs[doc["protocol"]["grid"]["fig1:bn"][0]]
    assert report.Arm({1: noisy}, 100).drift()[1] > 3 * report.Arm({1: bn}, 100).drift()[1]
    # depth breaks the plain sigmoid network within 1,500 steps, not the BN one (seen in the
    # quick run: about 10% against 93%)
    plain10 = max(runs[grid[f"depth:10:plain:{lr:g}"][0]].records[-1]["val_acc"] for lr in (0.5, 2))
    bn10 = max(runs[grid[f"depth:10:bn:{lr:g}"][0]].records[-1]["val_acc"] for lr in (0.5, 2))
    assert plain10 < 0.2 < 0.8 < bn10
    # part 6: the scaled network is its twin with lr / a² on the hidden weights and BN's ε / a²,
    # but for rounding (the weight norms are recorded to 6 decimals); with BN's own ε it is
    # close, and with lr / a² everywhere it is another run (seen: 5e-7, 2e-3 and 0.3)
    arm = {a: report.group(doc, runs, f"scale:10:{a}") for a in ("scaled", *report.TWINS)}
    scaled = arm["scaled"].runs[1]
    assert scaled.config["weight_scale"] == 10.0
    assert arm["hidden-lr-eps"].runs[1].config["eps"] == pytest.approx(1e-7)
    assert (
        arm["all-lr"].runs[1].config["lr"] == arm["hidden-lr"].runs[1].config["hidden_lr"] == 0.01
    )
    gaps = {a: report.largest_gaps(arm["scaled"], arm[a], 10.0)[1] for a in report.TWINS}
    assert gaps["hidden-lr-eps"][1] < 1e-5 < gaps["hidden-lr"][1] < 1e-2 < gaps["all-lr"][1]
    assert gaps["hidden-lr-eps"][0] < 0.01 < gaps["all-lr"][0]  # validation accuracy


def test_quick_study_report(quick_study):
    text = (quick_study / "report.md").read_text()
    assert "The pre-registered study `mechanism-v4-quick`" in text
    assert "All 26 runs have finished." in text
    assert "### Part 3: depth" in text and "| 13. Batch Renorm recovers" in text
    assert "## Part 6: the scale of the weights" in text and "| 15. What separates them" in text
    assert "| 6. With BN, a · ∂L/∂(aW) = ∂L/∂W" in text and "| 7. BN allows much higher" in text
    for claim in ("fig1, noisy-weak: ICS (the paper) or Santurkar?",
                  "fig1: BN reduces Santurkar's ICS", "fig1: BN makes the loss smoother"):  # fmt: skip
        assert claim in text
    for name in ("mechanism.png", "mechanism_lr.png", "mechanism_later.png", "mechanism_scale.png"):
        img = matplotlib.image.imread(quick_study / name)
        assert img.shape[1] > 1000 and img.std() > 0.05


def _records(run_dir: Path) -> list[dict]:
    return runfiles.read_records(run_dir)[0]


def _training(recs: list[dict]) -> list[tuple]:
    return [(r["step"], r["train_loss"], r["val_acc"], r["test_acc"]) for r in recs]


def test_instruments_leave_training_alone_and_a_noisy_run_resumes_exactly(data_root, tmp_path):
    mnist = data.load("mnist", data_root / "mnist", download=False)
    cfg = replace(
        mechanism.MechanismConfig(), network="noisy", noise_scale=3.0, noise_shift=2.0, steps=300,
        eval_every=100, instrument_every=100, seed=1,
    )  # fmt: skip
    exp = mechanism.EXPERIMENT
    prepared = exp.prepare(mnist, cfg)
    run_one(exp, cfg, tmp_path / "with", prepared, progress=False, echo=lambda s: None)
    quiet = replace(cfg, instrument_every=300)  # readings at step 0 only
    run_one(exp, quiet, tmp_path / "without", prepared, progress=False, echo=lambda s: None)
    with_ = _records(tmp_path / "with")
    assert sum("ics_rel" in r for r in with_) == 3
    assert _training(with_) == _training(_records(tmp_path / "without"))

    def stop(step: int) -> None:
        if step == 250:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(exp, cfg, tmp_path / "resumed", prepared, progress=stop, echo=lambda s: None)
    run_one(exp, cfg, tmp_path / "resumed", prepared, progress=False, echo=lambda s: None)
    resumed = _records(tmp_path / "resumed")
    keys = ("step", "train_loss", "val_acc", "ics_rel", "beta")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in with_]
    shift = json.loads((tmp_path / "resumed" / runfiles.SHIFT).read_text())
    assert shift == json.loads((tmp_path / "with" / runfiles.SHIFT).read_text())


# -- the rules on known numbers -------------------------------------------------------------------

NAMES = itertools.count()


def run(seed: int, first: int, *, ics: float, beta: float, drift: float, top: float = 0.96):
    """A finished 1,000-step run: validation accuracy 0.5 until step 100·first, then ``top``."""
    records = [
        {"step": 100 * i, "val_acc": 0.5 if i < first else top, "test_acc": 0.9,
         "ics_rel": [ics, ics], "ics_cos": [0.9, 0.9], "beta": beta}
        for i in range(11)
    ]  # fmt: skip
    layers = {"2": {"std_trained": {"per_interval": drift}}}
    return runfiles.RunFiles(
        path=Path(f"run{next(NAMES)}"), experiment="mechanism",
        config={"seed": seed, "steps": 1000}, network={"name": "x"}, records=records,
        extra={"shift": {"layers": layers}},
    )  # fmt: skip


def study(arms: dict[str, list[runfiles.RunFiles]]) -> tuple[dict, dict]:
    runs = {r.path.name: r for rs in arms.values() for r in rs}
    grid = {f"fig1:{a}": [r.path.name for r in rs] for a, rs in arms.items()}
    rules = {**RULES, "seeds": [1, 2, 3], "resolution": 100}
    return {"protocol": {"grid": grid, "rules": rules}}, runs


def arms(plain: int, bn: list[int], noisy: list[int], *, plain_ics=0.1, bn_ics=0.05,
         noisy_drift=5.0, top=0.96):  # fmt: skip
    return {
        "plain": [run(s, plain, ics=plain_ics, beta=2.0, drift=1.0, top=top) for s in (1, 2, 3)],
        "bn": [
            run(s, f, ics=bn_ics, beta=1.0, drift=0.5, top=top)
            for s, f in zip((1, 2, 3), bn, strict=True)
        ],
        "noisy-weak": [
            run(s, f, ics=0.2, beta=1.0, drift=noisy_drift)
            for s, f in zip((1, 2, 3), noisy, strict=True)
        ],
    }


def verdict(doc_runs, start: str) -> str:
    return next(v for c, m, v in report.verdicts(*doc_runs, "fig1") if c.startswith(start))


def test_noisy_bn_as_fast_as_bn_with_more_drift_supports_santurkar():
    s = study(arms(9, [2, 3, 2], [3, 3, 3]))
    assert verdict(s, "fig1, noisy-weak") == "supports Santurkar"
    assert verdict(s, "fig1, noisy-strong") == "pending"  # no run of it
    assert verdict(s, "fig1: BN reduces") == "yes"
    assert verdict(s, "fig1: BN makes the loss smoother") == "yes"
    assert verdict(s, "fig1: BN reaches 95%") == "yes"


def test_noisy_bn_that_loses_bn_s_gain_supports_the_ics_explanation():
    s = study(arms(9, [2, 3, 2], [7, 8, 6]))  # gain 6.67, noisy loses 4.67 ≥ half
    assert verdict(s, "fig1, noisy-weak") == "supports the ICS explanation"
    s = study(arms(9, [2, 3, 2], [7, 8, 6], bn_ics=0.2))  # but BN's ICS is not lower
    assert verdict(s, "fig1, noisy-weak") == "neither"
    assert verdict(s, "fig1: BN reduces") == "no (0 of 3)"


def test_the_target_falls_back_to_90_percent_and_a_never_counts_as_the_budget():
    s = study(arms(11, [2, 3, 2], [3, 3, 3], top=0.92))  # nobody reaches 95%; plain never 90%
    doc, runs = s
    measured = next(m for c, m, v in report.verdicts(doc, runs, "fig1") if c.startswith("fig1, n"))
    assert "steps to 90% (BN does not reach 95% in every seed)" in measured
    assert "plain 1,000" in measured  # never: the budget
    assert verdict(s, "fig1, noisy-weak") == "supports Santurkar"
    ics = next(m for c, m, v in report.verdicts(doc, runs, "fig1") if c.startswith("fig1: BN red"))
    assert "plain never reaches 90%" in ics and "barely learns" in ics
    s = study(arms(11, [2, 3, 2], [3, 3, 3], top=0.85))
    assert verdict(s, "fig1: 1, 2 and 5") == "no target"
    assert verdict(s, "fig1: BN reduces") == "yes"  # 3 and 4 need no target


def cell(lr: float, finals: list[float], diverged: int = 0) -> report.Cell:
    runs = {}
    for seed, v in enumerate(finals, 1):
        r = run(seed, 1, ics=0.1, beta=1.0, drift=1.0, top=v)
        if seed <= diverged:
            r.records[-1]["diverged"] = "the training loss is nan"
        runs[seed] = r
    return report.Cell(lr, runs)


def test_the_stable_range_is_the_run_of_good_cells_around_the_best():
    doc = {"protocol": {"rules": {**RULES, "seeds": [1, 2, 3]}}}
    row = [cell(0.1, [0.90] * 3), cell(1, [0.955] * 3), cell(2, [0.96] * 3),
           cell(5, [0.951] * 3), cell(10, [0.94] * 3), cell(20, [0.96] * 3, diverged=1)]  # fmt: skip
    assert row[-1].diverged == 1 and row[-1].final != row[-1].final  # NaN: a seed diverged
    assert report.stable_range(doc, row) == (1, 5)  # 20 is good but diverged once; 10 too low
    assert report.stable_range(doc, [cell(1, [0.1] * 3, diverged=3)]) is None


def test_the_study_needs_its_validation_images():
    from batchnorm.experiments.config import ConfigError

    with pytest.raises(ConfigError, match="validation"):
        mechanism.MechanismConfig(validation=0)
    with pytest.raises(ConfigError, match="noise_scale"):
        mechanism.MechanismConfig(network="bn", noise_scale=2.0)
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(ConfigError, match="weight_scale"):
            mechanism.MechanismConfig(weight_scale=bad)
    for bad in (-0.1, math.nan, True):
        with pytest.raises(ConfigError, match="hidden_lr"):
            mechanism.MechanismConfig(hidden_lr=bad, instruments=False)
    with pytest.raises(ConfigError, match="hidden_lr needs instruments off"):
        mechanism.MechanismConfig(hidden_lr=0.5)  # smoothness would probe another step


@pytest.mark.parametrize("quick", [False, True])
def test_one_run_name_is_one_config(quick):
    """The study trains one run per name: two settings under one name would lose one of them."""
    by_name = {}
    for _, cfg in protocol(STUDY_BASE, quick=quick).grid:
        assert by_name.setdefault(mechanism.run_name(cfg), cfg) == cfg
    assert len(by_name) == (26 if quick else 220)


def test_weight_scale_and_hidden_lr_reach_the_hidden_layers_only(data_root):
    mnist = data.load("mnist", data_root / "mnist", download=False)
    base = replace(mechanism.MechanismConfig(), hidden=(20, 30), seed=4, instruments=False)
    d = mechanism.EXPERIMENT.prepare(mnist, base)
    plain = mechanism.MechanismTask(base, d)
    task = mechanism.MechanismTask(replace(base, weight_scale=10.0, hidden_lr=0.25), d)
    lin = [m for m in task.model if isinstance(m, torch.nn.Linear)]
    lin0 = [m for m in plain.model if isinstance(m, torch.nn.Linear)]
    for m, m0 in zip(lin[:-1], lin0[:-1], strict=True):
        torch.testing.assert_close(m.weight, 10.0 * m0.weight, rtol=0, atol=0)
    torch.testing.assert_close(lin[-1].weight, lin0[-1].weight, rtol=0, atol=0)  # not the output
    hidden, rest = task.opt.param_groups
    assert hidden["lr"] == 0.25 and rest["lr"] == base.lr
    assert {id(p) for p in hidden["params"]} == {id(m.weight) for m in lin[:-1]}
    assert len(hidden["params"]) + len(rest["params"]) == len(list(task.model.parameters()))
    assert len(plain.opt.param_groups) == 1
    # with batch statistics the scaled network is the unscaled one with BN's ε / a²
    x, twin = d.x_val[:50], mechanism.MechanismTask(replace(base, eps=base.eps / 100), d)
    torch.testing.assert_close(task.model(x), twin.model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(task.model(x), plain.model(x), rtol=1e-5, atol=1e-6)
    names = {mechanism.run_name(c) for c in (base, replace(base, weight_scale=10.0),
             replace(base, hidden_lr=0.25), replace(base, eps=1e-7))}  # fmt: skip
    assert len(names) == 4
    # without BN the hidden layers have biases: they keep lr, and Dropout moves no layer
    cfg = replace(base, network="plain", dropout=0.2, weight_scale=0.5, hidden_lr=0.25)
    task = mechanism.MechanismTask(cfg, d)
    lin = [m for m in task.model if isinstance(m, torch.nn.Linear)]
    assert any(isinstance(m, torch.nn.Dropout) for m in task.model)
    hidden, rest = task.opt.param_groups
    assert {id(p) for p in hidden["params"]} == {id(m.weight) for m in lin[:-1]}
    assert {id(m.bias) for m in lin} <= {id(p) for p in rest["params"]}
    ref = mechanism.MechanismTask(replace(cfg, weight_scale=1.0, hidden_lr=0.0), d)
    ref_lin = [m for m in ref.model if isinstance(m, torch.nn.Linear)]
    for m, m0 in zip(lin, ref_lin, strict=True):
        factor = 0.5 if m is not lin[-1] else 1.0
        torch.testing.assert_close(m.weight, factor * m0.weight, rtol=0, atol=0)


# -- parts 3-5 on known numbers -------------------------------------------------------------------

JITTER = {1: 0.0, 2: 0.004, 3: -0.003, 4: 0.002, 5: -0.001}  # per seed: paired differences spread


def final_run(seed: int, test: float, *, val=None, train=None, diverged=False):
    """A finished 1,000-step run ending at ``test`` accuracy (``val``, ``train``: its others)."""
    test += JITTER.get(seed, 0.0)
    last = {"step": 1000, "val_acc": test if val is None else val, "test_acc": test,
            "train_acc": test if train is None else train + JITTER.get(seed, 0.0)}  # fmt: skip
    if diverged:
        last = {"step": 600, "diverged": "the training loss is nan"}
    records = [{"step": 0, "val_acc": 0.1, "test_acc": 0.1, "train_acc": 0.1}, last]
    return runfiles.RunFiles(
        path=Path(f"run{next(NAMES)}"), experiment="mechanism",
        config={"seed": seed, "steps": 1000}, network={"name": "x"}, records=records, extra={},
    )  # fmt: skip


def later_study(families: dict[str, list[runfiles.RunFiles]]) -> tuple[dict, dict]:
    runs = {r.path.name: r for rs in families.values() for r in rs}
    grid = {f: [r.path.name for r in rs] for f, rs in families.items()}
    rules = {**RULES, "seeds": [1, 2, 3], "resolution": 100}
    return {"protocol": {"grid": grid, "rules": rules}}, runs


def seeds(test: float, **kw) -> list[runfiles.RunFiles]:
    return [final_run(s, test, **kw) for s in (1, 2, 3)]


def depth_families(plain: dict[int, float], bn: dict[int, float]) -> dict:
    """Each depth's lr 0.5 at the given test accuracy; lr 0.1 and 2 worse on validation."""
    out = {}
    for arm, acc in (("plain", plain), ("bn", bn)):
        for d, a in acc.items():
            out[f"depth:{d}:{arm}:0.1"] = seeds(a - 0.05)
            out[f"depth:{d}:{arm}:0.5"] = seeds(a)
            out[f"depth:{d}:{arm}:2"] = seeds(a + 0.3, val=0.0)  # best test, worst validation
    return out


def later_verdict(s, start: str) -> str:
    return next(v for c, m, v in report.later_verdicts(*s) if c.startswith(start))


def test_depth_verdict_picks_each_lr_on_validation_and_needs_bn_to_win_deep():
    bn = {3: 0.96, 5: 0.96, 10: 0.95, 20: 0.94}
    s = later_study(depth_families({3: 0.95, 5: 0.94, 10: 0.11, 20: 0.10}, bn))
    assert report.chosen_lr(*s, 10, "plain") == 0.5  # not lr 2, the best on the test set
    assert later_verdict(s, "9.") == "reproduced"
    s = later_study(depth_families({3: 0.95, 5: 0.94, 10: 0.11, 20: 0.10}, {**bn, 20: 0.80}))
    assert later_verdict(s, "9.").startswith("partly: BN beats plain but loses more")
    s = later_study(depth_families({3: 0.95, 5: 0.94, 10: 0.95, 20: 0.10}, bn))
    assert later_verdict(s, "9.") == "partly: BN beats plain at the deepest only"
    s = later_study(depth_families({3: 0.95, 5: 0.94, 10: 0.95, 20: 0.94}, bn))
    assert later_verdict(s, "9.") == "not reproduced"
    families = depth_families({3: 0.95, 5: 0.94, 10: 0.11, 20: 0.10}, bn)
    families["depth:10:plain:0.1"] = [final_run(1, 0.99, diverged=True), *seeds(0.99)[1:]]
    assert report.chosen_lr(*later_study(families), 10, "plain") == 0.5  # a diverged cell: never
    del families["depth:20:bn:0.5"], families["depth:20:bn:0.1"], families["depth:20:bn:2"]
    assert later_verdict(later_study(families), "9.") == "pending"


def dropout_families(plain_gain: float, bn_gain: float, *, bn_gap=0.01) -> dict:
    return {
        "dropout:plain:0": seeds(0.95, train=1.0),  # gap 5 points
        "dropout:plain:0.2": seeds(0.95 + plain_gain, train=0.99),
        "dropout:plain:0.5": seeds(0.94),
        "dropout:bn:0": seeds(0.97, train=0.97 + bn_gap),
        "dropout:bn:0.2": seeds(0.97 + bn_gain),
        "dropout:bn:0.5": seeds(0.96),
    }


def test_dropout_verdicts_read_the_gap_and_what_dropout_adds():
    s = later_study(dropout_families(0.02, -0.01))
    assert later_verdict(s, "10.") == "yes"
    assert later_verdict(s, "11.") == "reproduced"
    assert later_verdict(later_study(dropout_families(-0.01, -0.01)), "11.").startswith(
        "not tested"
    )
    assert later_verdict(later_study(dropout_families(0.02, 0.02)), "11.") == "not reproduced"
    assert later_verdict(later_study(dropout_families(0.0, 0.0, bn_gap=0.1)), "10.").startswith(
        "no:"
    )
    families = dropout_families(0.0, 0.0)
    families["dropout:bn:0"] = [final_run(s, 0.97, train=0.97 + g)
                                for s, g in ((1, 0.08), (2, 0.0), (3, 0.05))]  # fmt: skip
    assert later_verdict(later_study(families), "10.") == "not distinguishable"


def batch_families(ghost: dict[int, float], renorm: dict[int, float]) -> dict:
    out = {f"batch:ghost:{k}": seeds(a) for k, a in ghost.items()}
    out |= {f"batch:renorm:{k}": seeds(a) for k, a in renorm.items()}
    return out


def test_small_batch_verdicts():
    ghost = {2: 0.90, 4: 0.93, 8: 0.96, 16: 0.97, 60: 0.97}
    s = later_study(batch_families(ghost, {2: 0.93, 4: 0.95}))
    assert later_verdict(s, "12.") == "reproduced"
    assert later_verdict(s, "13.") == "reproduced"
    s = later_study(batch_families({**ghost, 4: 0.97}, {2: 0.93, 4: 0.96}))
    assert later_verdict(s, "12.") == "partly: worse at 2 only"
    assert later_verdict(s, "13.") == "partly: 1 of 2"
    s = later_study(batch_families({**ghost, 16: 0.95}, {2: 0.89, 4: 0.92}))
    assert later_verdict(s, "12.") == "partly: worse at 16 too"
    assert later_verdict(s, "13.") == "not reproduced (0 of 2)"
    s = later_study(batch_families({**ghost, 2: 0.97}, {2: 0.93}))
    assert later_verdict(s, "12.") == "not reproduced"
    assert later_verdict(s, "13.") == "pending"  # no renorm at 4


# -- part 6 on known numbers -----------------------------------------------------------------------


def scale_families(
    shift: dict[str, dict[float, float]], *, spread: float = 0.0, diverged=()
) -> dict:
    """Scaled runs at 97% for a = 0.1 and 10, seeds 1-5; each twin ``shift[arm][a]`` below them,
    ± ``spread`` alternating over the seeds; a (arm, a, seed) in ``diverged`` diverged."""
    out = {}
    for a in (0.1, 10.0):
        out[f"scale:{a:g}:scaled"] = [final_run(s, 0.97) for s in range(1, 6)]
        for arm in report.TWINS:
            d = shift.get(arm, {}).get(a, 0.0)
            out[f"scale:{a:g}:{arm}"] = [
                final_run(s, 0.97 - d + spread * (-1) ** s, diverged=(arm, a, s) in diverged)
                for s in range(1, 6)
            ]
    return out


def norm_run(seed: int, norms: list[list[float]], accs: list[float], *, diverged=False):
    """A finished run with ``w_norm`` and ``val_acc`` at steps 0, 100, 200, ..."""
    records = [{"step": 100 * i, "val_acc": v, "test_acc": v, "w_norm": w}
               for i, (w, v) in enumerate(zip(norms, accs, strict=True))]  # fmt: skip
    records[-1]["step"] = 1000
    if diverged:
        records.append({"step": 1000, "diverged": "the training loss is nan"})
    return runfiles.RunFiles(
        path=Path(f"run{next(NAMES)}"), experiment="mechanism",
        config={"seed": seed, "steps": 1000}, network={"name": "x"}, records=records, extra={},
    )  # fmt: skip


def test_largest_gaps_divide_by_a_and_skip_step_0_and_divergence():
    a = 0.1
    scaled = report.Arm({1: norm_run(1, [[0.3, 9.0], [0.2, 0.4], [0.5, 0.6]], [0.1, 0.9, 0.95]),
                         2: norm_run(2, [[0.3, 9.0], [0.2, 0.4], [0.5, 0.6]], [0.1, 0.9, 0.95])},
                        100)  # fmt: skip
    twin = report.Arm({1: norm_run(1, [[1.0, 1.0], [2.0, 4.4], [5.0, 6.0]], [0.1, 0.8, 0.96]),
                       2: norm_run(2, [[1.0, 1.0], [2.0, 4.0], [5.0, 6.0]], [0.1, 0.9, 0.95],
                                   diverged=True)}, 100)  # fmt: skip
    gaps = report.largest_gaps(scaled, twin, a)
    assert gaps[1] == pytest.approx((0.1, 0.4 / 4.4))  # step 0 (8x off) is not compared
    assert all(math.isnan(g) for g in gaps[2])


def scale_verdict(families: dict, start: str, **rules) -> str:
    doc, runs = later_study(families)
    doc["protocol"]["rules"] |= {"scale_seeds": [1, 2, 3, 4, 5], **rules}
    return next(v for c, m, v in report.scale_verdicts(doc, runs) if c.startswith(start))


def test_scale_verdicts_ask_for_an_interval_inside_half_a_point():
    near = {"hidden-lr": {0.1: 0.002, 10.0: 0.001}}
    assert scale_verdict(scale_families(near), "14.") == "reproduced"
    assert scale_verdict(scale_families(near), "15.") == "yes"  # the ε twin: no difference
    far = {"hidden-lr": {0.1: 0.01, 10.0: 0.001}, "hidden-lr-eps": {0.1: 0.006}}
    assert scale_verdict(scale_families(far), "14.") == "partly: at a = 10"
    assert scale_verdict(scale_families(far), "15.") == "partly: at a = 10"
    # a mean of 0 is not enough: the interval must be narrow (spread ±0.6 pt over 5 seeds)
    assert scale_verdict(scale_families({}, spread=0.006), "14.") == "not reproduced"
    assert scale_verdict(scale_families({}, spread=0.006), "15.") == "no"
    assert scale_verdict(scale_families({}, spread=0.001), "14.") == "reproduced"
    # a diverged twin, or a diverged scaled run, is not equivalent, whatever the others say
    assert scale_verdict(scale_families({}, diverged={("hidden-lr", 0.1, 2)}), "14.") == (
        "partly: at a = 10"
    )
    families = scale_families({})
    families["scale:10:scaled"][3] = final_run(4, 0.97, diverged=True)
    assert scale_verdict(families, "14.") == "partly: at a = 0.1"
    assert scale_verdict(families, "15.") == "partly: at a = 0.1"
    families = scale_families({})
    families["scale:10:hidden-lr"][4] = final_run(6, 0.97)  # five seeds, not the registered
    assert scale_verdict(families, "14.") == "pending"
    families = scale_families({})
    families["scale:10:hidden-lr"] = families["scale:10:hidden-lr"][:4]  # seed 5 not finished
    assert scale_verdict(families, "14.") == "pending"
    one = {k: v[:1] for k, v in scale_families({}).items()}
    assert scale_verdict(one, "14.", scale_seeds=[1]).startswith("undecided: one seed")
