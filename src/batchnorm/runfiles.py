"""The run-file schema: what a run folder holds, written by :mod:`batchnorm.experiments` and read by
:mod:`batchnorm.reporting` (which never imports the experiments: a report is drawn from a run's
files alone, so an old run is reported the same way after the code changes).

A run folder holds one training run (one network, one setting, one seed):

- ``config.json``: written once, when the run starts::

      {"experiment": "convnet", "schema": 2,
       "network": {"name": "bn-x5", "label": "BN-x5", "bn": true, ...},
       "preset": null | "quick",
       "config": {...every setting...},
       "versions": {"batchnorm": ..., "torch": ..., ...}}

  ``network`` describes the network as the study defines it (its label in reports, whether it
  has BN, ...); ``preset`` names the CLI preset the settings came from. A later run in the same
  folder must have the same ``experiment`` and ``config`` and then resumes.
- ``env.json``: ``{"sessions": [...]}``, one entry per session (start, resumed-from step, versions,
  git revision, command, CPU, threads, kernel status, data source).
- ``metrics.jsonl``: one JSON object per evaluation (``step`` and the measurements); ``metrics.csv``
  holds its scalar columns. Timing fields end in ``_s``.
- ``checkpoint.pt`` (``torch.load(..., weights_only=True)``) and ``tb/`` (TensorBoard events).
- ``.lock``: present only while a process trains the run.

A folder of run folders (a study) may hold ``study.json``: ``{"experiment", "schema", "main":
{setting: value}}``, the setting a report gives its verdicts for.

Schema 1 is the format before the experiments shared one loop: no ``experiment``/``schema``/
``network`` keys, and an MNIST run folder trained both networks (its record keys end in
``_plain``/``_bn``). :func:`read_runs` reads it as two schema-2 runs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "ENV",
    "LOCK",
    "METRICS",
    "METRICS_CSV",
    "MNIST_JOINT_KEYS",
    "SCHEMA",
    "SENSITIVITY",
    "SHIFT",
    "STUDY",
    "RunFiles",
    "config_document",
    "find_runs",
    "read_config",
    "read_records",
    "read_run",
    "read_runs",
    "read_study",
    "score",
    "select",
]

SCHEMA = 2
CONFIG = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
STUDY = "study.json"
SENSITIVITY = "population_batches.json"
SHIFT = "shift.json"  # the mechanism study: drift summaries of every hidden sigmoid input


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder, parsed (and brought to the current schema)."""

    path: Path
    experiment: str
    config: dict
    network: dict
    records: list[dict]
    versions: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    preset: str | None = None
    extra: dict = field(default_factory=dict)  # other JSON files of the run, by stem
    # What the records were read from: "metrics.jsonl", or "metrics.csv" (no list-valued fields)
    source: str = METRICS

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record where ``key`` has a value."""
        pts = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


def config_document(
    experiment: str, config: Mapping, network: Mapping, *, preset: str | None, versions: Mapping
) -> dict:
    """The content of a new run's ``config.json``."""
    return {
        "experiment": experiment,
        "schema": SCHEMA,
        "network": dict(network),
        "preset": preset,
        "config": dict(config),
        "versions": dict(versions),
    }


def read_config(path: str | Path) -> dict:
    """A run folder's ``config.json`` as written (raises ``ValueError`` if it is not one)."""
    file = Path(path) / CONFIG
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not a config this program wrote ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{file} is not a config this program wrote (no 'config' object)")
    return doc


def read_records(path: str | Path) -> tuple[list[dict], str]:
    """The metrics of a run and the file they came from: ``metrics.jsonl``, or else the scalar
    columns of ``metrics.csv`` (numbers parsed, empty cells as ``None``)."""
    path = Path(path)
    if (path / METRICS).is_file():
        text = (path / METRICS).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()], METRICS
    if (path / METRICS_CSV).is_file():
        with open(path / METRICS_CSV, newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)], (
                METRICS_CSV
            )
    raise FileNotFoundError(f"{path} is not a run folder: {METRICS} is missing")


def _number(text: str) -> object:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def read_runs(path: str | Path) -> list[RunFiles]:
    """The run(s) of one run folder: one, or two for a schema-1 MNIST folder (both networks)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a run folder: {CONFIG} is missing")
    doc = read_config(path)
    records, source = read_records(path)
    if not records:
        raise ValueError(f"{path}/{METRICS} holds no measurements yet")
    env = json.loads((path / ENV).read_text()) if (path / ENV).is_file() else {}
    extra = {}
    if (path / SENSITIVITY).is_file():
        extra["population_batches"] = json.loads((path / SENSITIVITY).read_text())
    if (path / SHIFT).is_file():
        extra["shift"] = json.loads((path / SHIFT).read_text())
    if "schema" in doc:
        return [
            RunFiles(
                path,
                doc["experiment"],
                doc["config"],
                doc["network"],
                records,
                doc.get("versions", {}),
                env,
                doc.get("preset"),
                extra,
                source,
            )
        ]
    return _schema1(path, doc, records, env, extra, source)


def read_run(path: str | Path) -> RunFiles:
    """The one run of a run folder (see :func:`read_runs`)."""
    runs = read_runs(path)
    if len(runs) != 1:
        raise ValueError(f"{path} holds {len(runs)} runs (a schema-1 MNIST folder); use read_runs")
    return runs[0]


def find_runs(folder: str | Path) -> list[RunFiles]:
    """Every run directly inside ``folder`` (sorted by folder name), or ``folder``'s own."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / CONFIG).is_file():
        return read_runs(folder)
    return [
        run
        for p in sorted(folder.iterdir())
        if (p / CONFIG).is_file() and ((p / METRICS).is_file() or (p / METRICS_CSV).is_file())
        for run in read_runs(p)
    ]


def read_study(folder: str | Path) -> dict:
    """A study folder's ``study.json`` (``{}`` if it has none)."""
    path = Path(folder) / STUDY
    return json.loads(path.read_text()) if path.is_file() else {}


# -- schema 1 ---------------------------------------------------------------------------------------

# The convnet networks of schema 1, as the code of that time defined them.
_CONVNET_1 = {
    "baseline": ("Baseline", False, "relu"),
    "bn-baseline": ("BN-Baseline", True, "relu"),
    "bn-x5": ("BN-x5", True, "relu"),
    "bn-x30": ("BN-x30", True, "relu"),
    "bn-x5-sigmoid": ("BN-x5-Sigmoid", True, "sigmoid"),
    "baseline-x5": ("Baseline-x5", False, "relu"),
    "baseline-sigmoid": ("Baseline-Sigmoid", False, "sigmoid"),
    "bn-x5-slow-decay": ("BN-x5, Baseline's decay", True, "relu"),
}
_MNIST_1 = {"plain": ("without BN", False), "bn": ("with BN", True)}
# The record keys of both MNIST networks in one record (schema 1's format, and how the MNIST report
# pairs the two networks of a seed): joint key -> (network, a run's own key). Keys not listed are
# the run's own key with the network's suffix (unit_p15 -> unit_p15_plain), or shared (step).
MNIST_JOINT_KEYS = {
    "train_loss_plain": ("plain", "train_loss"),
    "train_loss_bn": ("bn", "train_loss"),
    "test_acc_plain": ("plain", "test_acc"),
    "test_loss_plain": ("plain", "test_loss"),
    "test_acc_bn_ema": ("bn", "test_acc"),
    "test_loss_bn_ema": ("bn", "test_loss"),
    "test_acc_bn_population": ("bn", "test_acc_population"),
    "test_loss_bn_population": ("bn", "test_loss_population"),
    "train_plain_s": ("plain", "train_s"),
    "train_bn_s": ("bn", "train_s"),
}


def _schema1(
    path: Path, doc: dict, records: list[dict], env: dict, extra: dict, source: str
) -> list[RunFiles]:
    cfg, versions = doc["config"], doc.get("versions", {})
    if "network" in cfg:  # convnet: the same settings, the network described from its name
        label, bn, activation = _CONVNET_1[cfg["network"]]
        network = {"name": cfg["network"], "label": label, "bn": bn, "activation": activation}
        preset = "quick" if cfg["steps"] < 10_000 else None  # schema 1's --quick preset
        cfg = {**cfg, "validation": 0}
        return [
            RunFiles(path, "convnet", cfg, network, records, versions, env, preset, extra, source)
        ]
    cfg = {k if k != "momentum" else "bn_momentum": v for k, v in cfg.items()}
    cfg["validation"] = 0
    out = []
    for name, (label, bn) in _MNIST_1.items():
        mine = []
        for r in records:
            rec = {}
            for key, value in r.items():
                if key in MNIST_JOINT_KEYS:
                    net, new = MNIST_JOINT_KEYS[key]
                    if net == name:
                        rec[new] = value
                elif key.endswith(f"_{name}") and key.startswith(("unit_p", "layer_p")):
                    rec[key.removesuffix(f"_{name}")] = value
                elif key == "eval_s":
                    if bn:  # one time for both networks: the BN network's (its Alg. 2 pass)
                        rec[key] = value
                elif not key.endswith(("_plain", "_bn")):
                    rec[key] = value  # step, epoch
            mine.append(rec)
        out.append(
            RunFiles(
                path,
                "mnist",
                {**cfg, "network": name},
                {"name": name, "label": label, "bn": bn},
                mine,
                versions,
                env,
                None,
                extra if bn else {},
                source,
            )
        )
    return out


# -- the selection rule of a pre-registered study ------------------------------------------------------


def score(run: RunFiles, metric: str, last: int) -> float:
    """The mean of ``metric`` over the run's last ``last`` evaluations that have it; −inf for a
    run that diverged (it has no last evaluations of its budget: it loses every comparison) or
    has none."""
    if run.records and run.records[-1].get("diverged"):
        return float("-inf")
    values = [r[metric] for r in run.records if r.get(metric) is not None][-last:]
    return sum(values) / len(values) if values else float("-inf")


def select(runs: list[RunFiles], metric: str, last: int) -> RunFiles:
    """The run with the highest :func:`score` (ties: the first in ``runs``' order). A study
    applies this to choose its winners, and its report applies it again to show them."""
    best = max(score(r, metric, last) for r in runs)
    return next(r for r in runs if score(r, metric, last) == best)
