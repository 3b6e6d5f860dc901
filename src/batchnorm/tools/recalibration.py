"""Recompute every BN layer's population statistics (Alg. 2 lines 8–10 of arXiv:1502.03167).

"Once the network has been trained, we use the normalization x̂ = (x − E[x]) / sqrt(Var[x] + ε)
using the population, rather than mini-batch, statistics": with the weights frozen, process many
training mini-batches and estimate E[x] and Var[x] for every BN layer. Moving averages (what
frameworks keep during training) lag behind the weights; a pass like this ("precise BN", Wu &
Johnson 2021) fixes train/eval gaps that come from stale statistics.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional.core import check_input
from ..functional.stats import PopulationStats
from ..functional.steps import moments
from .convert import _OURS, bn_layers

__all__ = ["LayerRecalibration", "RecalibrationReport", "recalibrate"]

Estimator = Literal["paper", "pooled"]
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class LayerRecalibration:
    """What :func:`recalibrate` did to one BN layer.

    Attributes:
        name: the layer's qualified name in the model.
        batches: mini-batches the layer saw (over all ranks).
        samples: values per channel it saw: N·H·W summed over batches (over all ranks).
        mean_shift: how far the old mean was from the new one, in new standard deviations:
            ``max_c |μ_new − μ_old| / sqrt(σ²_new + ε)``. 0 means unchanged.
        std_ratio: how much the normalizing scale changed: ``max_c max(s_new/s_old,
            s_old/s_new)`` with ``s = sqrt(σ² + ε)``. 1 means unchanged.
        updated: False if the layer saw no data and kept its old statistics.
    """

    name: str
    batches: int
    samples: int
    mean_shift: float
    std_ratio: float
    updated: bool


@dataclass(frozen=True)
class RecalibrationReport:
    """Per-layer results of :func:`recalibrate`; ``report["layer1.0.bn1"]`` looks one up."""

    estimator: str
    batches: int  # mini-batches drawn from the stream (over all ranks)
    layers: tuple[LayerRecalibration, ...]

    def __getitem__(self, name: str) -> LayerRecalibration:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no BN layer named {name!r}; layers: {[x.name for x in self.layers]}")

    def __str__(self) -> str:
        width = max([len(x.name) for x in self.layers] + [5])
        lines = [
            f"recalibrate ({self.estimator!r} estimator, {self.batches} batches)",
            f"  {'layer':<{width}}  {'samples':>9}  {'mean shift (σ)':>14}  {'std ratio':>9}",
        ]
        for x in self.layers:
            if x.updated:
                lines.append(
                    f"  {x.name:<{width}}  {x.samples:>9}  {x.mean_shift:>14.4g}  "
                    f"{x.std_ratio:>9.4g}"
                )
            else:
                lines.append(f"  {x.name:<{width}}  {'no data: kept its old statistics':>36}")
        return "\n".join(lines)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])  # (input, target, ...) as a DataLoader yields it
    kind = "a dict" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise TypeError(
        f"recalibrate: the batch stream yielded {kind}; by default a batch must be a tensor or a "
        "(input, target, ...) tuple. Pass forward=lambda model, batch: model(...) to say how a "
        "batch is fed to the model (and moved to its device)."
    )


def _torch_layer_hook(acc: PopulationStats, where: str, warned: list[bool]) -> Callable:
    """A forward pre-hook feeding a torch BN layer's input moments (float64) to ``acc``."""

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        check_input(x, module.num_features, True, where)
        mean, var = moments(x.detach())
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            if not warned[0]:
                warnings.warn(
                    f"recalibrate: {where}: the statistics of a batch were not finite (NaN or inf "
                    "in the input); the batch was skipped. This warning is shown once per layer.",
                    UserWarning,
                    stacklevel=2,
                )
                warned[0] = True
            return
        acc.update(mean, var, x.numel() // x.shape[1])

    return hook


def _all_reduce(
    accumulators: list[PopulationStats], channels: list[int], drawn: int, group: Any
) -> tuple[list[PopulationStats], int]:
    """Merge every rank's accumulators: all-gather them packed (float64) and merge them in rank
    order (Chan's formula for the pooled moments)."""
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    parts = [acc.pack(c, "cpu") for acc, c in zip(accumulators, channels, strict=True)]
    packed = torch.cat([torch.tensor([float(drawn)], dtype=torch.float64), *parts]).to(device)
    size = torch.tensor([packed.numel(), -packed.numel()], dtype=torch.long, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    if int(size[0]) != -int(size[1]):
        raise RuntimeError(
            "recalibrate: the model's BN layers differ between ranks (different numbers of "
            "layers or channels); every rank must recalibrate the same model"
        )
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    total_drawn = int(sum(float(g[0]) for g in gathered))
    merged = []
    offset = 1
    for part in parts:
        n = part.numel()
        acc = PopulationStats()
        for g in gathered:
            acc = acc.merge(PopulationStats.unpack(g[offset : offset + n].cpu()))
        merged.append(acc)
        offset += n
    return merged, total_drawn


def _describe(bn: nn.Module, name: str) -> str:
    return f"{type(bn).__name__}({bn.num_features}) '{name}'"


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    estimator: Estimator = "paper",
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    sync: bool | None = None,
    process_group: Any = None,
) -> RecalibrationReport:
    """Re-estimate the population statistics of every BN layer of ``model`` from training batches,
    with the weights frozen (Alg. 2 lines 8–10), and write them into ``running_mean`` and
    ``running_var`` (``num_batches_tracked`` becomes the number of batches used).

    Estimators (per channel, over the mini-batches B of sizes m_B the layer sees):

    - ``"paper"``: ``E[x] = E_B[μ_B]`` and ``Var[x] = E_B[m_B/(m_B−1) · σ²_B]``, every batch
      weighted equally, exactly Alg. 2 lines 9–10 when all batches have size m. It does not count
      the spread of the batch means, and it depends on how the data are batched.
    - ``"pooled"``: the mean and unbiased variance of every value seen, as if the whole stream
      were one batch, weighted by samples (a short last batch counts for what it holds). What
      "population statistics" usually means; independent of how the stream is cut into batches.

    With equal batch sizes both means are equal and the variances agree as m grows. For m' = m·p·q
    values per feature map of a conv layer (Sec. 3.2) the Bessel factor is m'/(m'−1).

    During the pass BN layers run in training mode (they normalize with each batch's statistics,
    as in training), every other module runs in eval mode (so Dropout is off and the statistics
    describe the activations inference will see), under ``torch.no_grad()``: nothing is updated
    through autograd and no graph is kept. Layers deeper than the first BN see inputs that depend
    on the batching too, through the batch statistics of the BN layers before them. Statistics
    are accumulated in float64 (our layers via ``stats_mode="population"``, torch's layers via a
    forward pre-hook; both compute the same numbers). A batch whose statistics are not finite is
    skipped with a warning.

    Afterwards every module's train/eval mode and every BN layer's ``momentum``, ``stats_mode``,
    ``freeze_stats`` and ``track_running_stats`` are as they were, also if the stream raises (then
    the old statistics are kept too). A layer that saw no data keeps its old statistics, with a
    warning. BN layers without running statistics are left alone.

    Args:
        model: the trained model, on the device the batches go to.
        batches: training mini-batches: tensors or ``(input, target, ...)`` tuples (a DataLoader),
            or anything ``forward`` understands. Training augmentation is fine: the statistics
            should describe the training distribution the weights were fit to.
        estimator: ``"paper"`` or ``"pooled"``.
        num_batches: use at most this many batches (for endless streams).
        forward: ``forward(model, batch)`` runs one batch (default: ``model(batch)`` or
            ``model(batch[0])``); move the batch to the model's device here if needed.
        sync: reduce the statistics over all ranks of ``process_group`` (float64; Chan's merge
            for "pooled"). Default: when ``torch.distributed`` is initialized. Every rank must
            call ``recalibrate`` then (with any number of batches, even none); pass
            ``sync=False`` to recalibrate on one rank alone. ``SyncBatchNorm`` layers also
            synchronize their batch statistics in every forward of the pass (as in training),
            so with them every rank must feed the same number of batches.
        process_group: the group to reduce over (default: the world).

    Returns:
        A :class:`RecalibrationReport`: per layer, the samples used and how far the statistics
        moved.
    """
    if estimator not in ("paper", "pooled"):
        raise ValueError(f"recalibrate: estimator must be 'paper' or 'pooled', got {estimator!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"recalibrate: num_batches must be >= 1, got {num_batches}")
    if sync is None:
        sync = dist.is_available() and dist.is_initialized()
    forward = forward or _default_forward
    layers = [(name, bn) for name, bn in bn_layers(model) if bn.running_mean is not None]
    if not layers:
        raise ValueError(
            "recalibrate: the model has no BN layer with running statistics to recalibrate"
        )

    modes = {m: m.training for m in model.modules()}
    saved = [
        (
            bn,
            bn.momentum,
            bn.track_running_stats,
            getattr(bn, "freeze_stats", None),
            getattr(bn, "stats_mode", None),
            {k: v.clone() for k in _BUFFERS if (v := bn._buffers.get(k)) is not None},
        )
        for _, bn in layers
    ]
    hooks = []
    accumulators: list[PopulationStats] = []
    updated: set[int] = set()
    try:
        model.eval()
        for name, bn in layers:
            bn.train()
            if isinstance(bn, _OURS):
                bn.freeze_stats = False
                bn.stats_mode = "population"
                bn.population.reset()
                accumulators.append(bn.population)
            else:
                acc = PopulationStats()
                bn.track_running_stats = False  # batch statistics, buffers untouched
                where = _describe(bn, name)
                hooks.append(bn.register_forward_pre_hook(_torch_layer_hook(acc, where, [False])))
                accumulators.append(acc)
        drawn = 0
        stream = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad():
            for batch in stream:
                forward(model, batch)
                drawn += 1
        if sync:
            channels = [bn.num_features for _, bn in layers]
            accumulators, drawn = _all_reduce(accumulators, channels, drawn, process_group)
        if drawn == 0:
            raise ValueError(
                "recalibrate: the batch stream was empty (an exhausted iterator?); no statistics "
                "were changed"
            )
        with torch.no_grad():
            report = [
                _write(name, bn, acc, old, estimator)
                for (name, bn), acc, (*_, old) in zip(layers, accumulators, saved, strict=True)
            ]
        updated = {id(bn) for (_, bn), r in zip(layers, report, strict=True) if r.updated}
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for bn, momentum, track, frozen, stats_mode, old in saved:
            bn.track_running_stats = track
            bn.momentum = momentum
            if isinstance(bn, _OURS):
                bn.freeze_stats = frozen
                if stats_mode != "population":
                    bn.stats_mode = stats_mode
            if id(bn) not in updated:  # no data, or the pass failed: the old statistics stay
                with torch.no_grad():
                    for k, v in old.items():
                        bn._buffers[k].copy_(v)
    unseen = [x.name for x in report if not x.updated]
    if unseen:
        warnings.warn(
            f"recalibrate: {len(unseen)} BN layer(s) saw no data and kept their old statistics: "
            f"{unseen}. Does the forward pass reach them (e.g. a branch the batches never take)?",
            UserWarning,
            stacklevel=2,
        )
    return RecalibrationReport(estimator, drawn, tuple(report))


def _write(
    name: str, bn: nn.Module, acc: PopulationStats, old: dict[str, Tensor], estimator: Estimator
) -> LayerRecalibration:
    batches, samples = acc.batches, acc.samples
    if batches == 0:
        return LayerRecalibration(name, 0, 0, math.nan, math.nan, False)
    mean, var = acc.estimate(estimator)
    mean, var = mean.to(bn.running_mean.device), var.to(bn.running_var.device)
    old_mean, old_var = old["running_mean"].double(), old["running_var"].double()
    new_std = torch.sqrt(var + bn.eps)
    ratio = new_std / torch.sqrt(old_var + bn.eps)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(batches)
    return LayerRecalibration(
        name,
        batches,
        samples,
        float(((mean - old_mean).abs() / new_std).max()),
        float(torch.maximum(ratio, 1 / ratio).max()),
        True,
    )
