"""A health check of every BN layer of a model: the layer-by-layer view users otherwise build by hand.

The usual BN failures show up at inference: eval-mode accuracy far below train-mode accuracy
(pytorch#4741, #5406), running statistics that turned into NaN (pytorch#88474), channels that
died. :func:`diagnose` runs the model *as it will be used* — eval mode, population statistics —
over a few batches, with a float64 hook on every BN layer, and compares, per channel:

- the running statistics with the mean and variance of the data actually reaching the layer
  (stale statistics: the weights moved on, the EMA lagged, the data changed, or an earlier layer's
  statistics were off and shifted everything below it — Alg. 2 assumes population statistics of
  the *trained* network);
- dead channels: input variance (or running variance) next to nothing, so the channel carries no
  signal and its normalization only amplifies noise;
- collapsed scale: |γ| near zero;
- non-finite running statistics, γ or β, and steps the non-finite guard skipped.

Nothing is changed: modes are restored, buffers untouched (hooks only read).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..functional.stats import PopulationStats
from ..functional.steps import moments
from .convert import bn_layers
from .recalibration import _default_forward

__all__ = ["BNHealthReport", "LayerHealth", "diagnose", "nonfinite_skips"]

# Thresholds behind the verdicts (each is a judgement, stated so users can apply their own):
STALE_SHIFT = 0.5  # running mean off the data mean by half a data standard deviation
STALE_RATIO = 1.5  # running std off the data std by 50% either way
DEAD_VAR = 1e-8  # relative to the layer's largest channel variance (and absolute below eps)
COLLAPSED_GAMMA = 1e-3  # |γ| below this times the layer's median |γ|


@dataclass(frozen=True)
class LayerHealth:
    """One BN layer as the data saw it in eval mode.

    Attributes:
        name: qualified name in the model.
        channels: number of channels.
        samples: values per channel seen (N·H·W over the batches).
        mean_shift: ``max_c |E[x] − running_mean| / sqrt(Var[x] + ε)``: how far the running mean
            is from the data's, in data standard deviations (0 is perfect).
        std_ratio: ``max_c max(s_run/s_data, s_data/s_run)`` with ``s = sqrt(var + ε)`` (1 is
            perfect): how far off the normalizing scale is.
        worst_channel: the channel with the largest mean shift.
        dead: channels whose input variance is negligible (no signal to normalize).
        collapsed: channels whose |γ| is negligible next to the layer's median |γ|.
        nonfinite: names of non-finite state (``running_mean``, ``weight``, ...).
        skipped_steps: training steps the non-finite guard refused (our layers; 0 for torch's).
    """

    name: str
    channels: int
    samples: int
    mean_shift: float
    std_ratio: float
    worst_channel: int
    dead: tuple[int, ...]
    collapsed: tuple[int, ...]
    nonfinite: tuple[str, ...]
    skipped_steps: int

    @property
    def stale(self) -> bool:
        return self.mean_shift > STALE_SHIFT or self.std_ratio > STALE_RATIO

    @property
    def problems(self) -> list[str]:
        out = []
        if self.nonfinite:
            out.append(f"non-finite {', '.join(self.nonfinite)}")
        if self.samples == 0:
            out.append("saw no data")
        elif self.stale:
            out.append(
                f"stale statistics (mean off by {self.mean_shift:.2g} σ at channel "
                f"{self.worst_channel}, scale off by {self.std_ratio:.2g}×)"
            )
        if self.dead:
            out.append(f"{len(self.dead)} dead channel(s) {_few(self.dead)}")
        if self.collapsed:
            out.append(f"{len(self.collapsed)} channel(s) with γ ≈ 0 {_few(self.collapsed)}")
        if self.skipped_steps:
            out.append(f"{self.skipped_steps} training step(s) skipped by the non-finite guard")
        return out


def _few(channels: tuple[int, ...]) -> str:
    shown = ", ".join(map(str, channels[:5]))
    return f"[{shown}{', ...' if len(channels) > 5 else ''}]"


@dataclass(frozen=True)
class BNHealthReport:
    """Per-layer results of :func:`diagnose`; ``report["layer1.0.bn1"]`` looks one up."""

    batches: int
    layers: tuple[LayerHealth, ...]
    limit: int | None = None  # num_batches, if the stream was cut there

    def __getitem__(self, name: str) -> LayerHealth:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def healthy(self) -> bool:
        return not any(layer.problems for layer in self.layers)

    def advice(self) -> list[str]:
        """What to do about what was found."""
        tips = []
        if any(layer.stale for layer in self.layers if layer.samples):
            tips.append(
                "stale statistics: re-estimate them from training batches with the weights "
                "frozen (Alg. 2): batchnorm.recalibrate(model, train_batches)"
            )
        if any(layer.nonfinite for layer in self.layers):
            tips.append(
                "non-finite state: load a checkpoint from before it appeared, or recalibrate; "
                "our layers' guard (guard_nonfinite=True, the default) keeps NaN out of running "
                "statistics in training"
            )
        if any(layer.dead for layer in self.layers):
            tips.append(
                "dead channels: the layer before feeds them a constant (e.g. a ReLU that never "
                "fires); they can be pruned, or check the learning rate and initialization"
            )
        return tips

    def _cut(self) -> str:
        if self.limit is None:
            return ""
        return f" (the first {self.limit}: num_batches={self.limit}; num_batches=None uses all)"

    def __str__(self) -> str:
        width = max([len(x.name) for x in self.layers] + [5])
        head = (
            f"BN health over {self.batches} batch(es){self._cut()}, eval mode\n"
            f"  {'layer':<{width}}  {'samples':>8}  {'mean shift σ':>12}  {'std ratio':>9}  problems"
        )
        rows = [
            f"  {x.name:<{width}}  {x.samples:>8}  {x.mean_shift:>12.3g}  {x.std_ratio:>9.3g}  "
            + ("; ".join(x.problems) or "ok")
            for x in self.layers
        ]
        tail = ["", *(f"advice: {t}" for t in self.advice())] if not self.healthy else []
        return "\n".join([head, *rows, *tail])


def nonfinite_skips(model: nn.Module) -> dict[str, int]:
    """How many training steps each of our BN layers in ``model`` refused to write into its
    running statistics because the batch statistics were not finite (the non-finite guard), by
    qualified name (the model's class name for the model itself); layers without the guard
    (torch's) are not listed. ``sum(nonfinite_skips(model).values()) > 0`` says whether any layer
    skipped a step.

    The counters are the layers' ``nonfinite_skips`` attributes, read afresh at each call (they are
    not buffers, so ``named_buffers()`` does not list them). Reading a counter on a CUDA device
    synchronizes with it.
    """
    return {
        name or type(m).__name__: int(m.nonfinite_skips)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "nonfinite_skips", None), torch.Tensor)
    }


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = 10,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> BNHealthReport:
    """Check every BN layer of ``model`` (ours and torch's) against the data reaching it.

    Args:
        model: the model as it will be used for inference.
        batches: input batches: tensors or ``(input, target, ...)`` tuples, e.g. a DataLoader
            over held-out or training data.
        num_batches: use at most this many batches (default 10: a few batches estimate the
            statistics well; ``None``: all). The report says when it stopped there.
        forward: how a batch is fed to the model (default: ``model(batch)`` or
            ``model(batch[0])``).

    The model runs in eval mode under ``no_grad``; its modes are restored afterwards and nothing
    in it changes.
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("diagnose: the model has no BatchNorm layers")
    forward = forward or _default_forward
    accs = [PopulationStats() for _ in layers]

    def hook_for(acc: PopulationStats) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.numel() // max(x.shape[1], 1)
            if m < 2:  # no batch statistics (the layer itself refuses or skips such a batch)
                return
            mean, var = moments(x)
            if bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
                acc.update(mean, var, m)

        return hook

    modes = {m: m.training for m in model.modules()}
    hooks = [
        bn.register_forward_pre_hook(hook_for(acc))
        for (_, bn), acc in zip(layers, accs, strict=True)
    ]
    drawn = 0
    try:
        model.eval()
        stream = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad():
            for batch in stream:
                forward(model, batch)
                drawn += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if drawn == 0:
        raise ValueError("diagnose: the batch stream was empty")
    cut = num_batches if num_batches is not None and drawn == num_batches else None
    return BNHealthReport(
        drawn,
        tuple(_layer_health(name, bn, acc) for (name, bn), acc in zip(layers, accs, strict=True)),
        cut,
    )


def _layer_health(name: str, bn: nn.Module, acc: PopulationStats) -> LayerHealth:
    state = {
        k: v
        for k, v in (
            ("running_mean", bn.running_mean),
            ("running_var", bn.running_var),
            ("weight", bn.weight),
            ("bias", bn.bias),
        )
        if v is not None
    }
    nonfinite = tuple(k for k, v in state.items() if not bool(torch.isfinite(v.detach()).all()))
    skipped = int(getattr(bn, "nonfinite_skips", 0))
    collapsed: tuple[int, ...] = ()
    if bn.weight is not None and not nonfinite:
        g = bn.weight.detach().double().abs().cpu()
        collapsed = tuple(
            int(c) for c in torch.nonzero(g < COLLAPSED_GAMMA * max(float(g.median()), 1e-30))
        )
    if acc.batches == 0:
        return LayerHealth(
            name, bn.num_features, 0, math.nan, math.nan, -1, (), collapsed, nonfinite, skipped
        )
    mean, var = (t.cpu() for t in acc.pooled())
    dead = tuple(
        int(c) for c in torch.nonzero((var <= DEAD_VAR * float(var.max())) | (var < bn.eps * 1e-3))
    )
    if bn.running_mean is None or nonfinite:  # batch statistics in eval too, or NaN state
        return LayerHealth(
            name,
            bn.num_features,
            acc.samples,
            math.nan,
            math.nan,
            -1,
            dead,
            collapsed,
            nonfinite,
            skipped,
        )
    run_mean = bn.running_mean.detach().double().cpu()
    run_var = bn.running_var.detach().double().cpu()
    data_std = torch.sqrt(var + bn.eps)
    run_std = torch.sqrt(run_var + bn.eps)
    alive = torch.ones_like(var, dtype=torch.bool)
    alive[list(dead)] = False  # a dead channel's statistics say nothing about staleness
    shift = ((mean - run_mean).abs() / data_std).where(alive, torch.zeros_like(var))
    ratio = torch.maximum(run_std / data_std, data_std / run_std).where(alive, torch.ones_like(var))
    return LayerHealth(
        name,
        bn.num_features,
        acc.samples,
        float(shift.max()),
        float(ratio.max()),
        int(shift.argmax()),
        dead,
        collapsed,
        nonfinite,
        skipped,
    )
