"""The pre-registered convnet study (experiments/convnet/protocol.py) and its report
(reporting/convnet_study.py): the quick protocol end to end on real Fashion-MNIST at a tiny size,
then every registered rule on runs with known numbers."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest

from batchnorm import data, runfiles
from batchnorm.cli import main
from batchnorm.experiments import convnet
from batchnorm.experiments.convnet.protocol import RULES, protocol
from batchnorm.experiments.protocol import run_protocol
from batchnorm.reporting import ReportError, write_report
from batchnorm.reporting import convnet_study as report
from batchnorm.reporting.convnet import ConvRun

# The quick protocol (21 runs) on a base small enough for CI: its structure, not its science.
TINY = dict(
    steps=20, eval_every=20, population_every=20, population_batches=4,
    test_examples=200, validation=200,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_study(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("convnet-study")
    fashion = data.load("fashion-mnist", data_root / "fashion-mnist", download=False)
    plan = protocol(replace(convnet.ConvnetConfig(), **TINY), quick=True)
    run_protocol(
        convnet.EXPERIMENT, plan, out, fashion, jobs=2, progress=False, echo=lambda s: None
    )
    assert main(["report", str(out)]) == 0
    return out


def test_tiny_study_runs_every_role_of_the_protocol(tiny_study):
    doc = runfiles.read_study(tiny_study)
    assert doc["protocol"]["name"] == "convnet-figure3-v1-quick"
    assert set(doc["roles"]) == {"tuned", "paper", "decay:2", "control", "budget:10"}
    runs = {r.path.name: r for r in runfiles.find_runs(tiny_study)}
    winner = runs[doc["winners"]["baseline"]].config
    for name in doc["roles"]["paper"]:  # the paper's networks derive from the tuned Baseline
        assert runs[name].config["base"]["lr"] == winner["lr"]
        assert runs[name].config["seed"] in (1, 2)
    budget = [runs[n] for n in doc["roles"]["budget:10"]]
    assert {r.network["name"] for r in budget} == {"baseline", "bn-x5"}
    assert all(r.config["steps"] == 10 for r in budget)


def test_tiny_study_report(tiny_study, tmp_path):
    text = (tiny_study / "report.md").read_text()
    assert "the pre-registered study `convnet-figure3-v1-quick`" in text
    assert "Recomputed from the grid's files: the same winners as `study.json`." in text
    assert "Every run of the study has finished." in text
    for claim in ("1. BN-x5 reaches", "1. BN, tuned reaches", "2. BN-Baseline, BN-x5 and BN-x30",
                  "3. BN-x30 ends", "4. BN-x30 starts slower", "5. The Baseline at 5×",
                  "6. BN-x5's factor grows"):  # fmt: skip
        assert claim in text, claim
    verdicts = text.split("## Verdicts")[1]
    assert "pending" not in verdicts  # every run finished: every rule applied
    for stem in ("study_figure2", "study_factors"):
        img = matplotlib.image.imread(tiny_study / f"{stem}.png")
        assert img.shape[1] > 1000 and img.std() > 0.05
    # the report is a function of the files: a copy of the three files per run redraws it
    for run in tiny_study.iterdir():
        if run.is_dir():
            (tmp_path / run.name).mkdir()
            for name in ("config.json", "env.json", "metrics.jsonl"):
                shutil.copy(run / name, tmp_path / run.name / name)
    shutil.copy(tiny_study / runfiles.STUDY, tmp_path / runfiles.STUDY)
    write_report(tmp_path)
    again = (tmp_path / "report.md").read_text()
    assert again == text.replace(str(tiny_study), str(tmp_path))
    assert (tmp_path / "study_factors.svg").read_bytes() == (
        tiny_study / "study_factors.svg"
    ).read_bytes()


def test_tiny_study_report_checks_the_winners_and_marks_an_unfinished_study(tiny_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    doc = json.loads((copy / runfiles.STUDY).read_text())
    other = next(n for n in doc["protocol"]["grid"]["bn"] if n != doc["winners"]["bn"])
    doc["winners"]["bn"] = other
    (copy / runfiles.STUDY).write_text(json.dumps(doc))
    shutil.rmtree(copy / doc["roles"]["control"][0])
    write_report(copy)
    text = (copy / "report.md").read_text()
    assert f"differs from study.json's {other}" in text
    assert "**Unfinished: 1 run(s)" in text and doc["roles"]["control"][0] in text
    shutil.rmtree(copy / doc["protocol"]["grid"]["baseline"][0])
    with pytest.raises(ReportError, match="the selection grid has not finished"):
        write_report(copy)


# -- the rules on known numbers -------------------------------------------------------------------

EVERY = 100
NAMES = itertools.count()  # every run its own folder name
LABELS = {
    "baseline": "Baseline",
    "bn-baseline": "BN-Baseline",
    "bn-x5": "BN-x5",
    "bn-x30": "BN-x30",
}


def run(net: str, seed: int, val: list[float], test: list[float] | None = None, *,
        label: str | None = None, diverged: bool = False) -> ConvRun:  # fmt: skip
    """A finished run with these validation (and test) accuracies at steps 0, 100, 200, …"""
    test = val if test is None else test
    records = [
        {"step": EVERY * i, "val_acc": v, "test_acc": t}
        for i, (v, t) in enumerate(zip(val, test, strict=True))
    ]
    if diverged:
        records[-1]["diverged"] = "loss is nan"
    cfg = {"network": net, "seed": seed, "steps": EVERY * (len(val) - 1),
           "recipe": {"lr": 0.1, "lr_half_life": 100.0}}  # fmt: skip
    return ConvRun(
        path=Path(f"{net}_seed{seed}_{next(NAMES)}"), experiment="convnet", config=cfg,
        network={"name": net, "label": label or LABELS.get(net, net)}, records=records,
    )  # fmt: skip


def study(roles: dict[str, list[ConvRun]]) -> report.Study:
    runs = {r.path.name: r for rs in roles.values() for r in rs}
    doc = {
        "protocol": {"rules": {**RULES, "seeds": [1, 2, 3]}, "grid": {}, "last": 1, "metric": {}},
        "roles": {role: [r.path.name for r in rs] for role, rs in roles.items()},
    }
    return report.Study(Path("study"), doc, runs)


def ramp(first: int, top: float = 0.9, n: int = 11) -> list[float]:
    """0.5 until step 100·(first − 1), then ``top`` from step 100·first on."""
    return [0.5 if i < first else top for i in range(n)]


BASE = [run("baseline", s, ramp(8)) for s in (1, 2, 3)]  # reaches T = 0.9 at step 800


def verdict(s: report.Study, start: str) -> tuple[str, str]:
    return next((m, v) for c, m, v in report.verdicts(s) if c.startswith(start))


def test_speedup_reproduced_partly_and_not():
    fast = [run("bn-x5", s, ramp(1)) for s in (1, 2, 3)]  # 8x, under 14.8 / 1.5
    s = study({"tuned": BASE, "paper": fast})
    assert report.factor(s, "paper", "bn-x5", "val_acc", 0.9).factors == [8.0, 8.0, 8.0]
    assert verdict(s, "1. BN-x5")[1] == "partly: faster in 3 of 3 seeds, factor 8.0×"
    bnb = [run("bn-baseline", s, ramp(2)) for s in (1, 2, 3)]  # 4x >= 2.3 / 1.5
    s = study({"tuned": BASE, "paper": bnb})
    assert verdict(s, "1. BN-Baseline")[1] == "reproduced"
    slow = [run("bn-x30", 1, ramp(4)), run("bn-x30", 2, ramp(9)), run("bn-x30", 3, ramp(11, 0.8))]
    s = study({"tuned": BASE, "paper": slow})
    measured, v = verdict(s, "1. BN-x30")
    assert v == "partly: faster in 1 of 3 seeds, factor 1.4×"  # mean of 2.0 and 800 / 900
    assert "400, 900, never" in measured
    never = [run("bn-x30", x, ramp(11, 0.8)) for x in (1, 2, 3)]
    assert verdict(study({"tuned": BASE, "paper": never}), "1. BN-x30")[1].startswith(
        "not reproduced"
    )


def test_a_baseline_seed_that_never_reaches_t_leaves_the_factor_undefined_but_counts_as_slower():
    base = [run("baseline", 1, ramp(8)), run("baseline", 2, ramp(8, 0.8))]  # T = 0.85
    bn = [run("bn-x5", s, ramp(1)) for s in (1, 2)]
    s = study({"tuned": base, "paper": bn})
    assert s.target("paper") == pytest.approx(0.85)
    f = report.factor(s, "paper", "bn-x5", "val_acc", s.target("paper"))
    assert f.base == [800, None] and f.factors == [8.0] and f.faster == 2


def test_claims_2_and_3_pair_the_best_test_accuracies_by_seed():
    def nets(delta: dict[str, list[float]]):
        return [
            run(n, s, ramp(2), ramp(2, 0.8 + d))
            for n, ds in delta.items()
            for s, d in zip((1, 2, 3), ds, strict=True)
        ]

    base = [run("baseline", s, ramp(8), ramp(8, 0.8)) for s in (1, 2, 3)]
    paper = nets({"bn-baseline": [0.01, 0.012, 0.011], "bn-x5": [0.01, -0.01, 0.005],
                  "bn-x30": [0.03, 0.031, 0.032]})  # fmt: skip
    s = study({"tuned": base, "paper": paper})
    assert verdict(s, "2. ")[1] == "partly: 2 of 3"
    assert verdict(s, "3. ")[1] == "reproduced"  # BN-x30 − BN-Baseline: +2.0 pt, tight
    paper = nets({"bn-baseline": [0.03, 0.01, 0.05], "bn-x5": [0.0, 0.0, 0.0],
                  "bn-x30": [0.04, 0.02, 0.04]})  # fmt: skip
    assert verdict(study({"tuned": base, "paper": paper}), "3. ")[1].startswith("partly")
    paper = nets({"bn-baseline": [0.05] * 3, "bn-x5": [0.0] * 3, "bn-x30": [0.03] * 3})
    assert verdict(study({"tuned": base, "paper": paper}), "3. ")[1] == "not reproduced"


def test_claim_4_counts_the_seeds_where_bn_x30_is_slower_to_t_minus_one_point():
    x5 = [run("bn-x5", s, ramp(2)) for s in (1, 2, 3)]
    x30 = [run("bn-x30", 1, ramp(3)), run("bn-x30", 2, ramp(2)), run("bn-x30", 3, ramp(11, 0.5))]
    s = study({"tuned": BASE, "paper": x5 + x30})
    measured, v = verdict(s, "4. ")
    assert v == "partly: 2 of 3"  # seed 2 ties; seed 3 never reaches it: slower
    assert "89.00%" in measured


def test_claim_6_the_factor_must_grow_with_the_budget():
    def budget(steps_base: int, steps_x5: int, seeds=(1, 2)):
        return [run("baseline", x, ramp(steps_base)) for x in seeds] + [
            run("bn-x5", x, ramp(steps_x5)) for x in seeds
        ]

    paper = [run("bn-x5", x, ramp(2)) for x in (1, 2, 3)]  # 4x at the study's budget
    grows = {"budget:500": budget(4, 2), "budget:2000": budget(10, 2)}  # 2x, 4x, 5x
    s = study({"tuned": BASE, "paper": paper, **grows})
    assert [steps for steps, _ in report.budgets(s)] == [500, 1000, 2000]
    assert verdict(s, "6. ")[1] == "reproduced"
    partly = {"budget:500": budget(4, 2), "budget:2000": budget(6, 2)}  # 2x, 4x, 3x
    assert verdict(study({"tuned": BASE, "paper": paper, **partly}), "6. ")[1].startswith("partly")
    flat = {"budget:500": budget(8, 2), "budget:2000": budget(6, 2)}  # 4x, 4x, 3x
    assert verdict(study({"tuned": BASE, "paper": paper, **flat}), "6. ")[1] == "not reproduced"
    undefined = {"budget:500": budget(4, 2), "budget:2000": budget(11, 2)}  # the Baseline never
    assert verdict(study({"tuned": BASE, "paper": paper, **undefined}), "6. ")[1].startswith(
        "not reproduced (the factor is undefined"
    )
    largest = report.largest_factor(study({"tuned": BASE, "paper": paper, **grows}))
    assert largest[0] == "BN-x5 (role budget:2000, 2 seed(s))" and largest[1].value == 5.0


def test_controls_and_pending_claims():
    controls = [
        run("bn-x5-sigmoid", 1, ramp(3, 0.85)),  # trains, never reaches T = 0.9
        run("baseline-sigmoid", 1, [0.1, 0.11, 0.12]),
        run("baseline-x5", 1, [0.1, 0.1], diverged=True),
    ]
    s = study({"tuned": BASE, "control": controls})
    assert verdict(s, "5. BN-x5-Sigmoid")[1] == "reproduced"
    assert verdict(s, "5. Without BN")[1] == "reproduced"
    assert verdict(s, "5. The Baseline at 5×")[1] == "reproduced"
    assert verdict(s, "1. BN-x5")[1] == "pending"  # no paper run has finished
    assert verdict(s, "2. ")[1] == "pending"
    s = study({"tuned": BASE, "control": controls[:2]})  # Baseline-x5 has not run
    assert verdict(s, "5. the controls")[1] == "pending"


def test_a_diverged_grid_run_loses_the_selection():
    ok = run("baseline", 0, [0.5, 0.8, 0.85])
    div = run("baseline", 0, [0.5, 0.9, 0.95])
    div.records[-1]["diverged"] = "the training loss is 1.2e+04"
    assert runfiles.score(div, "val_acc", 2) == float("-inf")
    assert runfiles.select([div, ok], "val_acc", 2) is ok
