"""What every report shares: reading a run folder, saving figures, formatting numbers over seeds.

A run folder is what :mod:`batchnorm.experiments.runs` writes: ``config.json``, ``env.json`` and
``metrics.jsonl``. Reports are drawn from those files alone.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._atomic import write_bytes

__all__ = ["RunFiles", "figure", "fmt_mean", "fmt_short", "read_run", "save_figure"]


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder, parsed."""

    path: Path
    config: dict
    versions: dict
    env: dict
    records: list[dict]

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record where ``key`` has a value."""
        pts = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


def read_run(path: str | Path) -> RunFiles:
    """Read a run folder; raises ``FileNotFoundError``/``ValueError`` naming what is missing."""
    path = Path(path)
    for name in ("config.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a run folder: {name} is missing")
    cfg = json.loads((path / "config.json").read_text())
    records = [
        json.loads(line)
        for line in (path / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if not records:
        raise ValueError(f"{path}/metrics.jsonl holds no measurements yet")
    env = json.loads((path / "env.json").read_text()) if (path / "env.json").is_file() else {}
    return RunFiles(path, cfg["config"], cfg.get("versions", {}), env, records)


# -- figures --------------------------------------------------------------------------------------


def figure(width: float, height: float, ncols: int):
    """A matplotlib figure (no pyplot state) with ``ncols`` axes side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def save_figure(fig, stem: Path) -> list[Path]:
    """PNG and SVG beside each other, written atomically. SVGs carry no date and derive their
    element ids from a fixed salt (not a random one), so redrawing the same data gives the same file."""
    import matplotlib

    paths = []
    for ext, kwargs in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "batchnorm"}):
            fig.savefig(buf, format=ext, **kwargs)
        path = stem.with_suffix(f".{ext}")
        write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


# -- numbers over seeds ---------------------------------------------------------------------------


def fmt_mean(vals: Sequence[float]) -> str:
    """One value as is; several as ``mean ± std (min, max, n)``, 4 decimals."""
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    sd = statistics.stdev(vals)
    return f"{statistics.fmean(vals):.4f} ± {sd:.4f} (min {min(vals):.4f}, max {max(vals):.4f}, n={len(vals)})"


def fmt_short(vals: Sequence[float], digits: int = 3) -> str:
    """One value as is; several as ``mean ± std``."""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"
