"""The mechanism study (experiments/mechanism, reporting/mechanism): the quick protocol end to end
on real MNIST; the instruments leave training bitwise alone and an interrupted noisy-BN run
resumes exactly; the registered rules on runs with known numbers."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest

from batchnorm import data, runfiles
from batchnorm.cli import main
from batchnorm.experiments import mechanism
from batchnorm.experiments.mechanism.protocol import RULES
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
    assert doc["protocol"]["name"] == "mechanism-v2-quick"
    grid = doc["protocol"]["grid"]
    lrs = {f"lr:{a}:{lr:g}" for a in ("plain", "bn") for lr in (0.2, 1, 5, 50)}
    assert set(grid) == {f"fig1:{a}" for a in report.ARMS} | lrs
    assert grid["lr:bn:1"] == grid["fig1:bn"]  # part 2's lr 1 is part 1's run, trained once
    assert "winners" in doc and doc["winners"] == {}  # nothing is selected
    runs = {r.path.name: r for r in runfiles.find_runs(quick_study)}
    noisy = runs[doc["protocol"]["grid"]["fig1:noisy-strong"][0]]
    assert (noisy.config["noise_scale"], noisy.config["noise_shift"]) == (3.0, 2.0)
    assert len(runs) == 10
    for run in runs.values():
        if run.records[-1].get("diverged"):
            continue
        readings = [r for r in run.records if "ics_rel" in r]
        assert [r["step"] for r in readings] == list(range(0, 1500, 100))
        assert all(len(r["ics_rel"]) == 3 and r["beta"] > 0 for r in readings)
        layers = run.extra["shift"]["layers"]
        assert len(layers) == 3  # every hidden sigmoid's input
        assert all(v["std_trained"]["start"] == 100 for v in layers.values())
    # noisy BN's inputs move more than BN's: the instrument sees the noise (training mode)
    bn = runs[doc["protocol"]["grid"]["fig1:bn"][0]]
    assert report.Arm({1: noisy}, 100).drift()[1] > 3 * report.Arm({1: bn}, 100).drift()[1]


def test_quick_study_report(quick_study):
    text = (quick_study / "report.md").read_text()
    assert "The pre-registered study `mechanism-v2-quick`" in text
    assert "All 10 runs have finished." in text
    assert "| 6. With BN, a · ∂L/∂(aW) = ∂L/∂W" in text and "| 7. BN allows much higher" in text
    for claim in ("fig1, noisy-weak: ICS (the paper) or Santurkar?",
                  "fig1: BN reduces Santurkar's ICS", "fig1: BN makes the loss smoother"):  # fmt: skip
        assert claim in text
    img = matplotlib.image.imread(quick_study / "mechanism.png")
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
