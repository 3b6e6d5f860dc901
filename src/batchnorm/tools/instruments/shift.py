"""Distribution shift per layer over training: Figure 1(b, c) of arXiv:1502.03167, for any layer.

The paper's case for *internal covariate shift* (Sec. 1–2) is Figure 1(b, c): the 15th, 50th and
85th percentiles of one last-hidden-layer unit's sigmoid input over training, drifting without BN
and nearly flat with it (Sec. 4.1). Santurkar et al. 2018 (arXiv:1805.11604, Sec. 2.1, Figure 2)
plot the same kind of distributions for noisy BN, whose inputs shift *more* than without BN while
it trains as fast as BN. :class:`ShiftTracker` records, at the steps you call it, per unit
(channel) of every tracked module's input (or output), on fixed held-out batches:

- mean and standard deviation (over every example and position of the probe set, float64,
  biased: these describe the probe set, not estimate a population);
- percentiles (default the paper's 15/50/85; linear interpolation, as ``torch.quantile``).

Drift summaries (:meth:`LayerShift.summary`) compare two records a, b of a unit with the
2-Wasserstein distance between the Gaussians of their mean m and standard deviation s, in units
of the unit's typical spread s̃ (its median s over the records of the window):

    d(a, b) = sqrt((m_b − m_a)² + (s_b − s_a)²) / s̃

(scale-free, so networks whose activations differ in size compare; 1 ≈ the distribution moved by
one of its own standard deviations; dividing by s̃ rather than by s_a keeps a near-constant
unit at initialization from making every later change look infinite), and take the *median over
units* (a few dead or exploding units do not dominate). Over the records from ``start`` on
(default: the first), three numbers, because the early phase — chance-level accuracy, weights far
from anything — can move every distribution a lot and hide what happens afterwards:

- ``from_reference``: max over records t ≥ start of d(start, t): the farthest the distributions
  got from where they were at the reference step. Choose ``start`` after the early phase (e.g.
  when accuracy leaves chance) to exclude it.
- ``per_interval``: median over consecutive record pairs (t_i, t_{i+1}) of d(t_i, t_{i+1}) ×
  1000 / (t_{i+1} − t_i): the typical change per 1000 steps. The median ignores a short early
  burst; record at a fixed interval to make "typical" mean the same across runs (a random walk's
  change grows like the square root of the interval, so the rate depends on it).
- ``range``: sqrt((max_t m − min_t m)² + (max_t s − min_t s)²) / s̃ over t ≥ start: the whole
  excursion (max − min) of the mean and the spread.

With ``units="absolute"`` the same numbers are in the activation's own units (no division by
s̃): right when the absolute position matters, e.g. sigmoid inputs, which saturate at a fixed
place whatever their spread. (Medians of an even count are the lower middle value, as
``torch.median``.)

Modes: ``mode="eval"`` (default) runs the probe in ``eval()`` — what the network computes on
held-out data, with BN's running statistics, Dropout off, noisy BN off; this is how the project's
Figure 1 reproduction measures. ``mode="train"`` runs it in ``train()`` — BN normalizes each probe
batch with its own statistics, Dropout and noise on — and then restores every buffer and random
stream, so training continues as if nothing ran. Either way the modes are restored afterwards.

Cost per :meth:`ShiftTracker.record`: one forward pass (no gradient) per probe batch, plus a sort
per tracked module; memory: the probe set's activations of every tracked module at once (float32
as computed), and one float64 copy of one module's at a time. Stored per record: (2 + Q) · C
float64 numbers per module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..convert import bn_layers
from ..recalibration import _default_forward
from ._common import LayerSpec, Snapshot, select_layers

__all__ = ["DriftSummary", "LayerShift", "ShiftReport", "ShiftTracker"]

Units = Literal["std", "absolute"]


@dataclass(frozen=True)
class DriftSummary:
    """Drift of one module's input (or output) distribution; see the module docstring."""

    name: str
    start: int  # the reference step: first record of the window
    records: int  # records in the window
    units: str  # "std" (of each unit, s̃) or "absolute" (the activation's own units)
    from_reference: float
    per_interval: float  # per 1000 steps
    range: float


@dataclass(frozen=True, eq=False)
class LayerShift:
    """One module's recorded distributions.

    Attributes:
        name: qualified name of the module.
        where: ``"input"`` or ``"output"``.
        steps: the steps recorded, increasing.
        quantiles: the quantile levels (0.15 = 15th percentile).
        mean: ``(T, C)`` per record and unit.
        std: ``(T, C)``.
        percentiles: ``(T, Q, C)``.
    """

    name: str
    where: str
    steps: tuple[int, ...]
    quantiles: tuple[float, ...]
    mean: Tensor
    std: Tensor
    percentiles: Tensor

    def unit(self, c: int) -> Tensor:
        """``(T, Q)``: the percentiles of unit ``c`` over training (a curve of Figure 1(b, c))."""
        return self.percentiles[:, :, c]

    def _index(self, step: int | None) -> int:
        if not self.steps:
            raise ValueError(f"'{self.name}': nothing was recorded")
        if step is None:
            return 0
        for i, s in enumerate(self.steps):
            if s >= step:
                return i
        raise ValueError(
            f"'{self.name}': no record at or after step {step} (last {self.steps[-1]})"
        )

    def _unit(self, step: int | None, units: Units) -> Tensor:
        if units == "absolute":
            return torch.ones(self.std.shape[1], dtype=torch.float64)
        if units == "std":
            return self.typical_std(step)
        raise ValueError(f"'{self.name}': units must be 'std' or 'absolute', got {units!r}")

    def typical_std(self, step: int | None = None) -> Tensor:
        """``(C,)``: each unit's median standard deviation over the records from ``step`` on, the
        unit in which every drift is measured (floored at 1e-12 of the largest, for dead units)."""
        s = self.std[self._index(step) :].median(dim=0).values
        return s.clamp_min(max(1e-12 * float(s.max()), 1e-300))

    def drift_from(self, step: int | None = None, units: Units = "std") -> Tensor:
        """``(T',)``: median over units of d(ref, t) for every record t from the reference (the
        first record at or after ``step``) on; starts with 0."""
        i = self._index(step)
        m, s = self.mean[i:], self.std[i:]
        return _median_units(_w2(m[:1], s[:1], m, s) / self._unit(step, units))

    def interval_change(self, step: int | None = None, units: Units = "std") -> Tensor:
        """``(T' − 1,)``: median over units of d(t_i, t_{i+1}) per 1000 steps, for consecutive
        records from ``step`` on."""
        i = self._index(step)
        m, s = self.mean[i:], self.std[i:]
        if len(m) < 2:
            return torch.empty(0, dtype=torch.float64)
        steps = torch.tensor(self.steps[i:], dtype=torch.float64)
        d = _median_units(_w2(m[:-1], s[:-1], m[1:], s[1:]) / self._unit(step, units))
        return d * 1000 / (steps[1:] - steps[:-1])

    def excursion(self, step: int | None = None, units: Units = "std") -> float:
        """Median over units of the max − min excursion of (mean, std) over the records from
        ``step`` on (``range`` of :class:`DriftSummary`)."""
        i = self._index(step)
        m, s = self.mean[i:], self.std[i:]
        dm = m.max(0).values - m.min(0).values
        ds = s.max(0).values - s.min(0).values
        return float(_median_units(torch.sqrt(dm**2 + ds**2) / self._unit(step, units)))

    def summary(self, start: int | None = None, units: Units = "std") -> DriftSummary:
        """The three drift numbers over the records from ``start`` on (default: all), in the
        units' typical standard deviations (``"std"``) or in the activation's own units."""
        i = self._index(start)
        per = self.interval_change(start, units)
        return DriftSummary(
            self.name,
            self.steps[i],
            len(self.steps) - i,
            units,
            float(self.drift_from(start, units).max()),
            float(per.median()) if len(per) else math.nan,
            self.excursion(start, units),
        )


def _w2(m_a: Tensor, s_a: Tensor, m_b: Tensor, s_b: Tensor) -> Tensor:
    """The 2-Wasserstein distance between N(m_a, s_a²) and N(m_b, s_b²), per unit (broadcast)."""
    return torch.sqrt((m_b - m_a) ** 2 + (s_b - s_a) ** 2)


def _median_units(d: Tensor) -> Tensor:
    return d.median(dim=-1).values


@dataclass(frozen=True, eq=False)
class ShiftReport:
    """Every tracked module's :class:`LayerShift`; ``report["2"]`` looks one up."""

    layers: tuple[LayerShift, ...]

    def __getitem__(self, name: str) -> LayerShift:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"no tracked module named {name!r}; tracked: {[x.name for x in self.layers]}"
        )

    def summary(self, start: int | None = None, units: Units = "std") -> tuple[DriftSummary, ...]:
        return tuple(layer.summary(start, units) for layer in self.layers)

    def __str__(self) -> str:
        if not self.layers or not self.layers[0].steps:
            return "distribution shift: nothing recorded"
        rows = self.summary()
        width = max([len(r.name) for r in rows] + [5])
        steps = self.layers[0].steps
        lines = [
            f"distribution shift over {len(steps)} records (steps {steps[0]}–{steps[-1]}), "
            f"in standard deviations (median over units)",
            f"  {'module':<{width}}  {'units':>5}  {'from ref':>9}  {'per 1k steps':>12}  "
            f"{'max−min':>8}",
        ]
        for r, layer in zip(rows, self.layers, strict=True):
            lines.append(
                f"  {r.name:<{width}}  {layer.mean.shape[1]:>5}  {r.from_reference:>9.4g}  "
                f"{r.per_interval:>12.4g}  {r.range:>8.4g}"
            )
        return "\n".join(lines)


class ShiftTracker:
    """Record the distributions of chosen modules' inputs (or outputs) on fixed probe batches at
    chosen training steps; see the module docstring.

    Example::

        tracker = ShiftTracker(model, [x_test[:1000]], modules=nn.Sigmoid)  # sigmoid inputs
        for step in range(steps):
            train_step(model)
            if step % 500 == 0:
                tracker.record(step)
        print(tracker.report())                       # drift summaries
        tracker.report()["4"].unit(7)                 # (T, 3): Figure 1(b, c) for unit 7

    Args:
        model: the model being trained.
        batches: fixed held-out probe batches (tensors or ``(input, target, ...)`` tuples, or
            whatever ``forward`` takes); kept by the tracker and reused at every record.
        modules: module names or modules, a module type (or tuple of types), or ``None`` for
            every BN layer.
        where: ``"input"`` (default: what the module receives) or ``"output"``.
        quantiles: quantile levels in [0, 1] (default the paper's 15th/50th/85th percentiles).
        mode: ``"eval"`` (default) or ``"train"``: the mode of the probe pass.
        forward: ``forward(model, batch)`` runs one batch (default: ``model(batch)`` or
            ``model(batch[0])``).

    The tensor a module receives (or returns) must have the units along dimension 1, like BN's
    input: ``(N, C)`` or ``(N, C, *)``.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        modules: LayerSpec = None,
        *,
        where: Literal["input", "output"] = "input",
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        mode: Literal["eval", "train"] = "eval",
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        tool = "ShiftTracker"
        if where not in ("input", "output"):
            raise ValueError(f"{tool}: where must be 'input' or 'output', got {where!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"{tool}: mode must be 'eval' or 'train', got {mode!r}")
        self.quantiles = tuple(float(q) for q in quantiles)
        if not all(0 <= q <= 1 for q in self.quantiles):
            raise ValueError(f"{tool}: quantiles must lie in [0, 1], got {quantiles!r}")
        if modules is None:
            found = bn_layers(model)
            if not found:
                raise ValueError(
                    f"{tool}: the model has no BN layer; say which modules to track (e.g. "
                    "modules=nn.Sigmoid for the sigmoid inputs of Figure 1)"
                )
            modules = [m for _, m in found]
        self.model = model
        self.layers = select_layers(model, modules, lambda m: False, tool)
        self.batches = list(batches)
        if not self.batches:
            raise ValueError(f"{tool}: no probe batches")
        self.where, self.mode = where, mode
        self.forward = forward or _default_forward
        self.steps: list[int] = []
        self._records: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in self.layers]

    def record(self, step: int) -> None:
        """Run the probe batches and store each tracked module's statistics under ``step``
        (steps must increase). The model is left exactly as it was."""
        if self.steps and step <= self.steps[-1]:
            raise ValueError(
                f"ShiftTracker.record: steps must increase, got {step} after {self.steps[-1]}"
            )
        seen: list[list[Tensor]] = [[] for _ in self.layers]
        handles = []
        snap = Snapshot(self.model)
        try:
            for (name, module), out in zip(self.layers, seen, strict=True):
                handles.append(self._hook(name, module, out))
            self.model.train(self.mode == "train")
            with torch.no_grad():
                for batch in self.batches:
                    self.forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
            snap.restore()
        stats = []
        for (name, _), xs in zip(self.layers, seen, strict=True):
            if not xs:
                raise ValueError(
                    f"ShiftTracker.record: module '{name}' was not called by the probe forward"
                )
            stats.append(_unit_stats(name, xs, self.quantiles))
        for rec, st in zip(self._records, stats, strict=True):
            rec.append(st)
        self.steps.append(int(step))

    def _hook(self, name: str, module: nn.Module, out: list[Tensor]) -> Any:
        def take(x: Any) -> None:
            if not isinstance(x, Tensor) or x.dim() < 2:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"ShiftTracker: module '{name}' ({type(module).__name__}) {self.where} is "
                    f"{shape}; expected a tensor (N, C) or (N, C, *) with the units along dim 1"
                )
            if out and x.shape[1] != out[0].shape[0]:
                raise ValueError(
                    f"ShiftTracker: module '{name}' {self.where} has {x.shape[1]} units, earlier "
                    f"{out[0].shape[0]}"
                )
            out.append(x.detach().transpose(0, 1).reshape(x.shape[1], -1))

        if self.where == "input":
            return module.register_forward_pre_hook(lambda m, args: take(args[0] if args else None))
        return module.register_forward_hook(lambda m, args, output: take(output))

    def report(self) -> ShiftReport:
        """The records so far."""
        layers = []
        for (name, _), rec in zip(self.layers, self._records, strict=True):
            if rec:
                mean = torch.stack([r[0] for r in rec])
                std = torch.stack([r[1] for r in rec])
                pct = torch.stack([r[2] for r in rec])
            else:
                mean = std = torch.empty(0, 0, dtype=torch.float64)
                pct = torch.empty(0, len(self.quantiles), 0, dtype=torch.float64)
            layers.append(
                LayerShift(name, self.where, tuple(self.steps), self.quantiles, mean, std, pct)
            )
        return ShiftReport(tuple(layers))

    def state_dict(self) -> dict[str, Any]:
        """The records (for checkpointing a run); the probe batches are not included."""
        return {
            "steps": list(self.steps),
            "names": [name for name, _ in self.layers],
            "quantiles": list(self.quantiles),
            "records": [[tuple(t.clone() for t in r) for r in rec] for rec in self._records],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [name for name, _ in self.layers]
        if state["names"] != names or tuple(state["quantiles"]) != self.quantiles:
            raise ValueError(
                f"ShiftTracker.load_state_dict: the state tracks {state['names']} at quantiles "
                f"{state['quantiles']}, this tracker {names} at {list(self.quantiles)}"
            )
        self.steps = [int(s) for s in state["steps"]]
        self._records = [[tuple(t.clone() for t in r) for r in rec] for rec in state["records"]]


def _unit_stats(
    name: str, xs: list[Tensor], quantiles: tuple[float, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit mean, biased std and quantiles (float64, CPU) over every value of ``xs``."""
    x = torch.cat([t.double().cpu() for t in xs], dim=1)  # (C, M)
    if x.shape[1] == 0:
        raise ValueError(f"ShiftTracker: module '{name}' saw no values (empty probe batches)")
    mean = x.mean(dim=1)
    std = (x - mean[:, None]).pow(2).mean(dim=1).sqrt()  # two-pass, biased
    return mean, std, _quantiles(x, quantiles)


def _quantiles(x: Tensor, q: tuple[float, ...]) -> Tensor:
    """``(Q, C)`` quantiles of each row of ``x`` with linear interpolation (``torch.quantile``'s
    default), by sorting: no size limit (``torch.quantile`` refuses inputs over 2^24 values)."""
    xs = x.sort(dim=1).values
    n = xs.shape[1]
    pos = torch.tensor(q, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo.double())[:, None]
    return xs[:, lo].T * (1 - frac) + xs[:, hi].T * frac
