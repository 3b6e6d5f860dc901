"""A study: several runs of one experiment, one after the other or in parallel processes.

Every experiment describes itself with an :class:`Experiment` (its config class, its networks, how
to prepare its data and build the :class:`~.loop.Task` of one run, how its run folders are
named); :func:`run_one` trains one config with :func:`~.loop.train`, :func:`run_study` many, into
``out/<run name>``, in this process or in ``jobs`` worker processes (each loads the data itself).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data, runfiles
from . import runs
from .config import Config, with_values
from .loop import Task, train

__all__ = ["EXPERIMENTS", "Experiment", "get", "run_one", "run_study"]

# The studies, by the name `batchnorm reproduce <name>` takes (each a package of this one).
EXPERIMENTS = ("mnist", "convnet", "mechanism")


@dataclass(frozen=True)
class Experiment:
    """What the framework needs to know of one study."""

    name: str
    summary: str  # one line: `batchnorm reproduce --help`
    description: str  # a paragraph: `batchnorm reproduce <name> --help`
    config: type[Config]
    networks: Mapping[str, dict]  # name -> the network's description in config.json
    task: Callable[[Any, Any], Task]  # (config, prepared data) -> the run's task
    prepare: Callable[[data.Dataset, Any], Any]  # (data set, config) -> prepared data
    data_key: Callable[[Any], tuple]  # configs with equal keys share prepared data
    run_name: Callable[[Any], str]
    check_fits: Callable[[Any, int, int], None]  # (config, train images, test images)
    presets: Mapping[str, Mapping[tuple[str, ...], object]] = field(default_factory=dict)
    derived: tuple[str, ...] = ()  # config.json keys computed from others (not compared)
    network_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # "all", ...
    # The pre-registered study `batchnorm reproduce <name>` runs without run-choosing flags:
    # (base config, quick) -> Protocol; and the base config it starts from.
    protocol: Callable[[Any, bool], Any] | None = None
    study_base: Any = None

    def preset(self, cfg: Config, name: str | None) -> Config:
        """``cfg`` with the preset ``name`` applied (``None``: unchanged)."""
        return cfg if name is None else with_values(cfg, dict(self.presets[name]))

    def document(self, cfg: Any, preset: str | None) -> dict:
        """The run's ``config.json``."""
        return runfiles.config_document(
            self.name,
            cfg.to_dict(),
            {"name": cfg.network, **self.networks[cfg.network]},
            preset=preset,
            versions=runs.versions(),
        )


def get(name: str) -> Experiment:
    """The experiment called ``name`` (its package is imported on first use)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"no experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__package__}.{name}").EXPERIMENT


def run_one(
    experiment: Experiment,
    cfg: Any,
    run_dir: str | os.PathLike,
    prepared: Any,
    *,
    preset: str | None = None,
    progress: bool | Callable[[int], None] = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train one config into ``run_dir`` (or resume it); returns ``run_dir``."""
    return train(
        experiment.task(cfg, prepared),
        run_dir,
        experiment.document(cfg, preset),
        seed=cfg.seed,
        threads=cfg.threads,
        processes=cfg.processes,
        source=prepared.source,
        derived=experiment.derived,
        progress=progress,
        echo=echo,
    )


def run_study(
    experiment: Experiment,
    configs: Sequence[Any],
    out: str | os.PathLike,
    dataset: data.Dataset,
    *,
    preset: str | None = None,
    jobs: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Run every config into ``out/<run name>``: in this process one after the other
    (``jobs`` = 1), or in ``jobs`` worker processes. Returns the run folders.

    Raises :class:`~.runs.RunError` naming every run that failed (the others complete);
    ``KeyboardInterrupt`` stops every run at its last checkpoint.
    """
    out = Path(out)
    dirs = [out / experiment.run_name(c) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two configs share a run folder: vary what the folder names vary")
    if jobs <= 1:
        prepared: dict[tuple, Any] = {}
        for cfg, run_dir in zip(configs, dirs, strict=True):
            key = experiment.data_key(cfg)
            if key not in prepared:
                prepared = {key: experiment.prepare(dataset, cfg)}  # keep one in memory
            run_one(
                experiment, cfg, run_dir, prepared[key], preset=preset, progress=progress, echo=echo
            )
        return dirs
    tasks = [
        (experiment.name, cfg, str(run_dir), dataset.name, str(dataset.source), preset, progress)
        for cfg, run_dir in zip(configs, dirs, strict=True)
    ]
    runs.run_parallel(
        _worker,
        tasks,
        [cfg.steps for cfg in configs],
        jobs=jobs,
        names=[d.name for d in dirs],
        progress=progress,
        echo=echo,
    )
    return dirs


def _worker(
    name: str,
    cfg: Any,
    run_dir: str,
    dataset: str,
    folder: str,
    preset: str | None,
    show: bool,
    progress: Callable[[int], None],
) -> None:
    """One run in a worker process: load the data from where the parent found it, then train.
    With the parent's bar on, it reports its step to it; else it prints a line per evaluation."""
    experiment = get(name)
    prepared = experiment.prepare(data.load(dataset, folder, download=False), cfg)
    run_one(experiment, cfg, run_dir, prepared, preset=preset, progress=progress if show else False)
