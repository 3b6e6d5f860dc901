"""Plots and reports, drawn from a run's files alone (:mod:`batchnorm.runfiles`).

Nothing here imports :mod:`batchnorm.experiments`: the experiments write the files, this reads
them, so a run is reported the same way whatever the code that trains has become since.
:func:`write_report` regenerates the report of a run or study folder, choosing the report by the
experiment its ``config.json`` files name.
"""

from __future__ import annotations

from pathlib import Path

from .. import runfiles
from .common import ReportError

__all__ = ["ReportError", "write_report"]


def write_report(folder: str | Path) -> Path:
    """Regenerate the plots and ``report.md`` of ``folder``; return the report's path."""
    folder = Path(folder)
    runs = runfiles.find_runs(folder)  # FileNotFoundError: the folder does not exist
    if not runs:
        raise ReportError(
            f"{folder} holds no run: expected a run folder (config.json and metrics.jsonl) or a "
            "folder of run folders, as `batchnorm reproduce <experiment> --out ...` writes"
        )
    kinds = sorted({r.experiment for r in runs})
    if len(kinds) > 1:
        raise ReportError(f"{folder} mixes runs of several experiments ({', '.join(kinds)})")
    if kinds[0] == "mnist":
        from . import mnist

        return mnist.write_reports(folder, runs)
    if kinds[0] == "convnet":
        if "protocol" in runfiles.read_study(folder):  # the pre-registered study
            from . import convnet_study

            return convnet_study.write_study_report(folder, runs)
        from . import convnet

        return convnet.write_report(folder, runs)
    if kinds[0] == "mechanism":
        from . import mechanism

        return mechanism.write_report(folder, runs)
    raise ReportError(f"{folder}: no report for experiment {kinds[0]!r}")
