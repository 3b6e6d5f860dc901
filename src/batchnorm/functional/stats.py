"""Per-channel moments, their numerically safe merge, and the population estimators of Algorithm 2.

Numerical choices, in one place:

- Statistics of float16/bfloat16 inputs are computed in float32; float32 inputs are reduced with
  float64 accumulators inside the fused kernels (see ``csrc/batchnorm_cpu.cpp``); everything that
  is summed *across* batches or processes here is float64.
- Variances are never formed as E[x²] − E[x]² of raw values, which cancels catastrophically for
  inputs like 1e4 + N(0, 1). Within a batch we use two-pass or shifted sums; across batches and
  ranks we merge ``(count, mean, M2)`` triples with the parallel formula of Chan, Golub & LeVeque
  (1979), which is exact in exact arithmetic and stable in floating point.
- ``running_var`` stores the *unbiased* variance (torch's convention, and the m/(m−1) of Alg. 2
  line 10) while the training forward normalizes with the *biased* one (Alg. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments", "PopulationStats", "merge_moments"]


@dataclass(frozen=True)
class Moments:
    """Per-channel ``count``, ``mean`` and ``m2`` = Σ (x − mean)² of some set of values."""

    count: Tensor  # () or (C,), float64
    mean: Tensor  # (C,)
    m2: Tensor  # (C,)

    @staticmethod
    def from_batch(mean_b: Tensor, var_b: Tensor, m: int | Tensor) -> Moments:
        """Moments of one mini-batch from its mean and biased variance (Alg. 1) over ``m`` values."""
        count = torch.as_tensor(m, dtype=torch.float64, device=mean_b.device)
        return Moments(count, mean_b.double(), var_b.double() * count)

    @property
    def var(self) -> Tensor:
        """Biased variance m2 / count."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> Tensor:
        """Unbiased variance m2 / (count − 1)."""
        return self.m2 / (self.count - 1)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel merge of two sets of moments; either may be empty (count 0)."""
    n = a.count + b.count
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe_n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe_n)
    return Moments(n, mean, m2)


class PopulationStats:
    """Accumulates batch statistics for the population estimate of Algorithm 2, in float64.

    Two estimators come out of the same pass:

    - ``paper()``: E[x] = E_B[μ_B] and Var[x] = m/(m−1) · E_B[σ²_B] (Alg. 2 lines 9–10), every
      mini-batch weighted equally. When batches differ in size each contributes its own
      m_B/(m_B−1) · σ²_B, which is exactly the paper's formula when all batches have size m.
    - ``pooled()``: the mean and unbiased variance of every value seen, as if the whole stream were
      one batch (batches weighted by their size; merged with :func:`merge_moments`). It does not
      depend on how the stream was split into batches; the paper's estimate does (it also counts
      the spread of the batch means as variance only through the Bessel factor).

    With equal batch sizes the two means agree exactly, and the variances agree as m grows.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self._sum_mean: Tensor | None = None
        self._sum_var: Tensor | None = None
        self._pooled: Moments | None = None

    @property
    def samples(self) -> int:
        """Values seen per channel."""
        return 0 if self._pooled is None else int(self._pooled.count)

    def update(self, mean_b: Tensor, var_b: Tensor, m: int) -> None:
        """Add one mini-batch: its per-channel mean, biased variance and size m (> 1)."""
        if m < 2:
            raise ValueError(f"a population estimate needs mini-batches of m > 1 values, got m={m}")
        mean64, var64 = mean_b.detach().double(), var_b.detach().double()
        unbiased = var64 * (m / (m - 1))  # Alg. 2 line 10's Bessel factor, per batch
        if self._sum_mean is None:
            self._sum_mean, self._sum_var = mean64.clone(), unbiased
            self._pooled = Moments.from_batch(mean64, var64, m)
        else:
            self._sum_mean += mean64
            self._sum_var += unbiased
            self._pooled = merge_moments(self._pooled, Moments.from_batch(mean64, var64, m))
        self.batches += 1

    def merge(self, other: PopulationStats) -> PopulationStats:
        """The accumulator of both streams (e.g. two processes' shares of the batches)."""
        if other.batches == 0:
            return self._copy()
        if self.batches == 0:
            return other._copy()
        out = PopulationStats()
        out.batches = self.batches + other.batches
        out._sum_mean = self._sum_mean + other._sum_mean
        out._sum_var = self._sum_var + other._sum_var
        out._pooled = merge_moments(self._pooled, other._pooled)
        return out

    def pack(self, channels: int, device: torch.device | str | None = None) -> Tensor:
        """Every sufficient statistic as one float64 vector (zeros when empty), for exchanging
        between processes: ``[batches, samples, Σμ_B (C), Σ unbiased σ²_B (C), mean (C), M2 (C)]``."""
        if self.batches == 0:
            return torch.zeros(2 + 4 * channels, dtype=torch.float64, device=device)
        p = self._pooled
        head = torch.tensor([float(self.batches), float(p.count)], dtype=torch.float64)
        body = torch.cat([self._sum_mean, self._sum_var, p.mean, p.m2])
        return torch.cat([head.to(body.device), body]).to(device)

    @staticmethod
    def unpack(v: Tensor) -> PopulationStats:
        """The inverse of :meth:`pack`."""
        c = (v.numel() - 2) // 4
        out = PopulationStats()
        out.batches = int(v[0])
        if out.batches:
            out._sum_mean, out._sum_var = v[2 : 2 + c].clone(), v[2 + c : 2 + 2 * c].clone()
            out._pooled = Moments(
                v[1].clone(), v[2 + 2 * c : 2 + 3 * c].clone(), v[2 + 3 * c :].clone()
            )
        return out

    def _copy(self) -> PopulationStats:
        out = PopulationStats()
        out.batches = self.batches
        if self.batches:
            p = self._pooled
            out._sum_mean, out._sum_var = self._sum_mean.clone(), self._sum_var.clone()
            out._pooled = Moments(p.count.clone(), p.mean.clone(), p.m2.clone())
        return out

    def _require_data(self) -> None:
        if self.batches == 0:
            raise RuntimeError("no mini-batches were accumulated; nothing to estimate from")

    def paper(self) -> tuple[Tensor, Tensor]:
        """(E[x], Var[x]) as Algorithm 2 estimates them, in float64."""
        self._require_data()
        return self._sum_mean / self.batches, self._sum_var / self.batches

    def pooled(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased variance) of all values seen, in float64."""
        self._require_data()
        return self._pooled.mean, self._pooled.unbiased_var

    def estimate(self, estimator: str) -> tuple[Tensor, Tensor]:
        if estimator == "paper":
            return self.paper()
        if estimator == "pooled":
            return self.pooled()
        raise ValueError(f"unknown population estimator {estimator!r}; use 'paper' or 'pooled'")
