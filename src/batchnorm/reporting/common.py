"""What every report shares: figures, templates, numbers over seeds (the run files themselves are
read by :mod:`batchnorm.runfiles`)."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

from .._atomic import write_bytes

__all__ = [
    "ReportError",
    "band",
    "figure",
    "first_step",
    "fmt_mean",
    "fmt_short",
    "percentile_ranges",
    "save_figure",
    "template",
]


class ReportError(ValueError):
    """A folder cannot be reported; the message says why."""


def template(name: str) -> Template:
    """The report template ``templates/<name>`` (``$name`` placeholders, ``string.Template``)."""
    return Template(resources.files(__package__).joinpath("templates", name).read_text())


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


def band(ax, curves: Sequence[tuple[Sequence[int], Sequence[float]]], label: str, *,
         alpha: float = 0.2, **style) -> None:  # fmt: skip
    """The mean of ``curves`` (``(steps, values)`` of each seed, cut to the shortest) as a line,
    with their min–max as a band when there are several; ``style`` goes to the line (its
    ``color`` also to the band)."""
    n = min(len(c[0]) for c in curves)
    steps = curves[0][0][:n]
    cols = [[c[1][j] for c in curves] for j in range(n)]
    ax.plot(steps, [statistics.fmean(v) for v in cols], label=label, **style)
    if len(curves) > 1:
        ax.fill_between(steps, [min(v) for v in cols], [max(v) for v in cols],
                        color=style["color"], alpha=alpha, lw=0)  # fmt: skip


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


# -- curves ---------------------------------------------------------------------------------------


def first_step(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The first step whose value reaches ``threshold`` (None: never)."""
    return next((s for s, v in zip(steps, values, strict=True) if v >= threshold), None)


def percentile_ranges(
    p15: Sequence[float], p50: Sequence[float], p85: Sequence[float]
) -> tuple[float, float]:
    """How much a unit's input distribution moved over records: the range (max − min) of its
    median and the range of its 15–85 spread."""
    spread = [b - a for a, b in zip(p15, p85, strict=True)]
    return max(p50) - min(p50), max(spread) - min(spread)
