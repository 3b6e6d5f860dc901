"""A pre-registered study: a selection grid, a rule that picks each family's winner on validation
images, and the runs that follow from the winners — written in code before the first run.

:func:`run_protocol` runs it in a study folder and records in ``study.json`` (before any run)
the protocol as data, its text, and the commit that last changed the protocol's source (the
registration); after the grid it records the winners and the runs of each role. Reports
recompute the winners from the run files with the same rule
(:func:`batchnorm.runfiles.select`) and check them against ``study.json``. Everything is
resumable: a stopped study started again with the same command continues where it was, and
selection, a pure function of the grid's files, picks the same winners.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data, runfiles
from .._atomic import write_text
from .study import Experiment, run_study

__all__ = ["Protocol", "run_protocol"]


@dataclass(frozen=True)
class Protocol:
    """What a study will run and how it will judge, fixed before it runs.

    ``grid``: ``(family, config)`` pairs of the selection stage. Each family's winner is the
    grid run with the highest mean of ``metric[family]`` over its last ``last`` evaluations (ties:
    the first in grid order); a family without a metric has no winner (a study without selection
    gives an empty ``metric``). ``then(winners)`` gives the ``(role, config)`` pairs of the
    following runs from the winners' saved configs (``{family: config dict}``). ``rules`` are the
    thresholds the report applies; ``text`` says all of it in words.
    """

    name: str
    source: str  # the module that defines the protocol (its last commit is the registration)
    text: str
    grid: Sequence[tuple[str, Any]]
    metric: dict[str, str]
    last: int
    then: Callable[[dict[str, dict]], list[tuple[str, Any]]]
    rules: dict = field(default_factory=dict)


def _registration(source: str) -> str:
    """The last commit that changed ``source`` (a module's file), and whether it has changed
    since: the protocol as registered is the code at that commit."""
    path = Path(source)
    try:
        log = subprocess.run(
            ["git", "log", "-1", "--format=%H %cI", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if log.returncode != 0:
        return "unknown (not a git checkout)"
    if not log.stdout.strip():
        return "not committed (the protocol's file is new)"
    return log.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def run_protocol(
    experiment: Experiment,
    protocol: Protocol,
    out: str | os.PathLike,
    dataset: data.Dataset,
    *,
    preset: str | None = None,
    jobs: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run ``protocol`` into ``out``; return the study document (``study.json``)."""
    out = Path(out)
    path = out / runfiles.STUDY
    doc = runfiles.read_study(out)
    grid_names = {}
    for family, cfg in protocol.grid:
        grid_names.setdefault(family, []).append(experiment.run_name(cfg))
    plan = {
        "name": protocol.name,
        "text": protocol.text,
        "metric": protocol.metric,
        "last": protocol.last,
        "rules": protocol.rules,
        "grid": grid_names,
    }
    if doc.get("protocol") not in (None, plan):
        raise ValueError(
            f"{out} holds a study run under another protocol ({doc['protocol']['name']}); "
            "choose another --out"
        )
    if "protocol" not in doc:
        doc = {
            "experiment": experiment.name,
            "schema": runfiles.SCHEMA,
            "preset": preset,
            "protocol": plan,
            "registered": _registration(protocol.source),
        }
        write_text(path, json.dumps(doc, indent=2) + "\n")
    echo(
        f"protocol {protocol.name}: {sum(map(len, grid_names.values()))} grid runs, then the winners"
    )
    # a run may serve several families: it trains once
    configs = list({experiment.run_name(c): c for _, c in protocol.grid}.values())
    run_study(
        experiment, configs, out, dataset, preset=preset, jobs=jobs, progress=progress, echo=echo
    )
    runs = {r.path.name: r for r in runfiles.find_runs(out)}
    winners = {  # a protocol without a metric selects nothing: its grid is the study
        family: runfiles.select([runs[n] for n in names], protocol.metric[family], protocol.last)
        for family, names in grid_names.items()
        if family in protocol.metric
    }
    if winners:
        echo(
            "selected on validation: "
            + ", ".join(f"{f}: {w.path.name}" for f, w in winners.items())
        )
    follow = protocol.then({f: w.config for f, w in winners.items()})
    roles: dict[str, list[str]] = {}
    for role, cfg in follow:
        roles.setdefault(role, []).append(experiment.run_name(cfg))
    doc["winners"] = {f: w.path.name for f, w in winners.items()}
    doc["roles"] = roles
    write_text(path, json.dumps(doc, indent=2) + "\n")
    unique = list({experiment.run_name(c): c for _, c in follow}.values())
    run_study(
        experiment, unique, out, dataset, preset=preset, jobs=jobs, progress=progress, echo=echo
    )
    return doc
