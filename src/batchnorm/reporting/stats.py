"""The statistics of the study reports: paired t intervals over seeds, percentile bootstrap
intervals, and how a verdict says its count.

Seeds are the unit of replication: every interval is over seeds (the runs of one seed share
their initial weights' seed and their data order across networks, so differences are paired).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "bootstrap", "mean_interval", "t_quantile"]

# Two-sided 95% quantiles of Student's t, by degrees of freedom (from the t table; df > 30: the
# normal 1.96 is within 2% of t).
_T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
}  # fmt: skip


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    if level != 0.95:
        raise ValueError("only 95% intervals are tabulated")
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    for k in sorted(_T95, reverse=True):
        if df >= k:
            return _T95[k] if df <= 30 or k < 30 else 1.96
    return _T95[1]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval (``low``/``high`` None: one value, no interval)."""

    value: float
    low: float | None
    high: float | None
    n: int

    @property
    def above(self) -> bool:
        """The whole interval lies above 0."""
        return self.low is not None and self.low > 0

    def fmt(self, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        v = (
            f"{scale * self.value:+.{digits}f}"
            if self.low is not None
            else f"{scale * self.value:.{digits}f}"
        )
        if self.low is None:
            return f"{v}{unit} (n={self.n})"
        return f"{v}{unit} [{scale * self.low:+.{digits}f}, {scale * self.high:+.{digits}f}] (n={self.n})"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean with Student's t interval (for paired differences: pass the per-seed differences)."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return Interval(m, None, None, n)
    half = t_quantile(n - 1, level) * statistics.stdev(values) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def bootstrap(
    samples: Sequence[object],
    statistic: Callable[[Sequence[object]], float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``statistic(samples)`` with a percentile bootstrap interval: ``samples`` (one per seed)
    resampled with replacement ``resamples`` times by a generator seeded with ``seed`` (so a
    report is the same every time). Resamples where the statistic is not finite are dropped."""
    value = statistic(samples)
    if len(samples) < 2:
        return Interval(value, None, None, len(samples))
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        s = statistic([samples[rng.randrange(len(samples))] for _ in samples])
        if math.isfinite(s):
            stats.append(s)
    if not stats:
        return Interval(value, None, None, len(samples))
    stats.sort()
    lo = stats[int((1 - level) / 2 * (len(stats) - 1))]
    hi = stats[int((1 + level) / 2 * (len(stats) - 1))]
    return Interval(value, lo, hi, len(samples))
