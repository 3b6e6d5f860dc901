"""The committed results: every report in ``results/`` is what its own files give.

A reader checks a claim by running ``batchnorm report results/<study>``; these tests do that on a
copy and require the committed ``report.md`` back, character for character, so a report edited by
hand or left behind by a change of the reporting code fails here.
"""

import shutil
from pathlib import Path

import pytest

from batchnorm.reporting import write_report

RESULTS = Path(__file__).resolve().parent.parent / "results"
STUDIES = sorted(p.name for p in RESULTS.glob("*/") if (p / "report.md").exists())


def test_there_are_committed_studies():
    assert {"mnist", "convnet", "mechanism"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_committed_report_is_regenerated_from_its_files(name, tmp_path, monkeypatch):
    shutil.copytree(RESULTS / name, tmp_path / "results" / name)
    (tmp_path / "results" / name / "report.md").unlink()
    monkeypatch.chdir(tmp_path)  # the report names its folder as given: results/<name>
    path = write_report(Path("results") / name)
    assert path.read_text() == (RESULTS / name / "report.md").read_text()
