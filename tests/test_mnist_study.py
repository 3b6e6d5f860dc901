"""The pre-registered Figure 1 study (experiments/mnist/protocol.py, experiments/protocol.py) and
its report (reporting/mnist_study.py): the quick protocol end to end on real MNIST, then the
report's rules on runs with known numbers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from batchnorm import runfiles
from batchnorm.cli import main
from batchnorm.reporting import ReportError, write_report
from batchnorm.reporting import mnist_study as study_report
from batchnorm.reporting.stats import Interval


@pytest.fixture(scope="module")
def quick_study(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    args = ["reproduce", "mnist", "--quick", "--jobs", "2", "--no-progress"]
    args += ["--data-dir", str(data_root / "mnist"), "--out", str(out)]
    assert main(args) == 0
    return out


def test_quick_study_runs_the_protocol_and_records_it(quick_study):
    doc = json.loads((quick_study / runfiles.STUDY).read_text())
    proto = doc["protocol"]
    assert proto["name"] == "mnist-figure1-v1-quick"
    assert proto["metric"] == {"plain": "val_acc", "bn": "val_acc_population"}
    assert doc["registered"].split()[0].isalnum() and len(doc["registered"].split()[0]) == 40
    grid = proto["grid"]
    assert len(grid["plain"]) == len(grid["bn"]) == 4
    # the winners are what the rule picks from the grid's files
    runs = {r.path.name: r for r in runfiles.find_runs(quick_study)}
    for family, names in grid.items():
        best = runfiles.select([runs[n] for n in names], proto["metric"][family], proto["last"])
        assert doc["winners"][family] == best.path.name
        assert runs[best.path.name].config["seed"] == 0
    # the evaluation seeds run the winners' settings, never seed 0
    for name in doc["roles"]["tuned"]:
        run = runs[name]
        winner = runs[doc["winners"][run.network["name"]]].config
        assert (run.config["lr"], run.config["init_std"]) == (winner["lr"], winner["init_std"])
        assert run.config["seed"] in proto["rules"]["seeds"] == [1, 2]
        assert run.records[-1]["step"] == run.config["steps"] == 2000
    # the validation images are held out of training: the runs say so
    assert all(r.config["validation"] == 10_000 for r in runs.values())


def test_quick_study_report_applies_the_registered_rules(quick_study):
    text = (quick_study / "report.md").read_text()
    assert "the pre-registered study `mnist-figure1-v1-quick`" in text
    assert "Recomputed from the grid's files: the same winners as `study.json`." in text
    for claim in ("1. BN ends with a higher test accuracy", "3. BN rises faster", "4. the median"):
        assert claim in text
    assert "not comparable (fewer than the paper's 50,000 steps)" in text  # 2,000-step quick
    assert "paired over seeds [1, 2]" in text
    for stem in ("study_grid", "study_tuned"):
        img = matplotlib.image.imread(quick_study / f"{stem}.png")
        assert img.shape[1] > 1000 and img.std() > 0.05


def test_study_report_says_when_study_json_names_another_winner(quick_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_study, copy)
    doc = json.loads((copy / runfiles.STUDY).read_text())
    others = [n for n in doc["protocol"]["grid"]["bn"] if n != doc["winners"]["bn"]]
    doc["winners"]["bn"] = others[0]
    (copy / runfiles.STUDY).write_text(json.dumps(doc))
    write_report(copy)
    assert f"differs from study.json's {others[0]}" in (copy / "report.md").read_text()


def test_study_report_of_an_unfinished_grid_says_to_continue(quick_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_study, copy)
    doc = json.loads((copy / runfiles.STUDY).read_text())
    shutil.rmtree(copy / doc["protocol"]["grid"]["plain"][1])
    with pytest.raises(ReportError, match="the selection grid has not finished"):
        write_report(copy)


# -- the rules on known numbers -------------------------------------------------------------------


def test_interval_verdicts():
    assert study_report._interval_verdict(Interval(0.01, 0.002, 0.02, 5)) == "reproduced"
    assert study_report._interval_verdict(Interval(0.01, -0.002, 0.02, 5)) == "partly"
    assert study_report._interval_verdict(Interval(-0.01, -0.02, 0.001, 5)) == "not reproduced"
    assert study_report._interval_verdict(Interval(0.01, None, None, 1)) == "partly"  # one seed


def test_range_verdicts_widen_by_the_reading_tolerance():
    rng = (0.96, 0.97)
    v = study_report._range_verdict
    assert v(Interval(0.975, 0.9705, 0.98, 5), *rng, 0.0025) == "reproduced"  # meets 0.9725
    assert v(Interval(0.978, 0.9735, 0.98, 5), *rng, 0.0025) == "partly"  # meets 0.9775
    assert v(Interval(0.99, 0.985, 0.995, 5), *rng, 0.0025) == "not reproduced (higher)"
    assert v(Interval(0.90, 0.89, 0.91, 5), *rng, 0.0025) == "not reproduced (lower)"


def test_count_verdicts():
    assert study_report._count_verdict(5, 5) == "reproduced"
    assert study_report._count_verdict(2, 5) == "partly: 2 of 5"
    assert study_report._count_verdict(0, 10) == "not reproduced (0 of 10)"
    assert study_report._count_verdict(0, 0) == "not reproduced (0 of 0)"


def _run(records: list[dict]) -> runfiles.RunFiles:
    cfg = {"steps": records[-1]["step"], "lr": 0.5, "init_std": 0.01, "seed": 1}
    return runfiles.RunFiles(Path("x"), "mnist", cfg, {"name": "plain"}, records)


def test_drift_after_the_accuracy_threshold_and_over_the_whole_run():
    """Two units; the medians move by 3 early (before 90%) and by 0.5 after; spreads fixed."""
    recs = []
    for step, med, acc in ((0, 0.0, 0.1), (100, 3.0, 0.5), (200, 1.0, 0.92), (300, 1.5, 0.95)):
        recs.append(
            {
                "step": step,
                "val_acc": acc,
                "layer_p50": [med, -med],
                "layer_p15": [med - 1, -med - 2],
                "layer_p85": [med + 1, -med + 2],
                "unit_p15": med - 1,
                "unit_p50": med,
                "unit_p85": med + 1,
            }
        )
    recs.append({"step": 400, "val_acc": 0.96})  # an evaluation without the layer's percentiles
    d = study_report.drift(_run(recs), "val_acc", 0.9)
    assert d.reached == 200
    assert d.whole_median == pytest.approx(2.0)  # steps 100-300: 3.0 - 1.0 (step 0 excluded)
    assert d.after_median == pytest.approx(0.5) and d.after_spread == pytest.approx(0.0)
    assert d.unit_median == pytest.approx(2.0) and d.unit_spread == pytest.approx(0.0)
    never = study_report.drift(_run(recs), "val_acc", 0.99)
    assert never.reached is None and never.after_median is None
    assert study_report._ratio(None, 1.0) is None and study_report._ratio(2.0, 0.0) > 1e9


def test_drift_needs_the_layer_records():
    recs = [{"step": s, "val_acc": 0.5} for s in (0, 100, 200)]
    with pytest.raises(ReportError, match="fewer than 2 records of every unit's percentiles"):
        study_report.drift(_run(recs), "val_acc", 0.9)


def test_faster_is_the_fraction_of_the_run_to_the_baseline_s_final_validation_accuracy():
    plain = _run([{"step": s, "val_acc": a} for s, a in ((0, 0.1), (500, 0.9), (1000, 0.94))])
    bn = _run(
        [{"step": s, "val_acc_population": a} for s, a in ((0, 0.1), (500, 0.95), (1000, 0.97))]
    )
    doc = {"protocol": {"last": 2, "metric": {"plain": "val_acc", "bn": "val_acc_population"}}}
    s = study_report.Study(Path("x"), doc, {})
    assert study_report._faster(s, {"plain": plain, "bn": bn}) == 0.5  # target 0.92, at 500
    slow = _run([{"step": s, "val_acc_population": 0.5} for s in (0, 500, 1000)])
    assert math.isinf(study_report._faster(s, {"plain": plain, "bn": slow}))
