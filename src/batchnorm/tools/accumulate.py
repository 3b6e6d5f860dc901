"""Running statistics under gradient accumulation: one update per optimizer step, not per micro-batch.

With gradient accumulation an effective batch of B·k values is fed as k micro-batches of B. Each
BN layer normalizes each micro-batch with its own statistics (that is what the forward computes,
and it cannot be otherwise without a second pass), but it also updates its running statistics k
times, each time with a noisy B-sample estimate and k times the intended momentum
(pytorch#46516). Inside :func:`accumulate_statistics` every BN layer instead merges its
micro-batches' moments (float64, Chan et al.'s formula, weighted by size) and, when the block
ends, makes ONE update with the mean and unbiased variance of the whole effective batch, by the
layer's own rule (EMA, cumulative, or population mode; non-finite guard included) — what the layer
would have recorded had the effective batch come in one piece.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..functional.core import nonfinite_message, update_running_stats
from ..functional.stats import PopulationStats
from ..functional.steps import moments
from ..nn.modules import _BatchNormMixin
from .convert import bn_layers

__all__ = ["accumulate_statistics"]


@contextlib.contextmanager
def accumulate_statistics(model: nn.Module) -> Iterator[None]:
    """Within the ``with`` block, BN layers of ``model`` (ours, SyncBatchNorm, torch's) gather the
    statistics of every training forward and update their running statistics once on exit.

    Example::

        for step in range(steps):
            with batchnorm.accumulate_statistics(model):
                for micro_batch, target in chunks:          # k micro-batches
                    loss = loss_fn(model(micro_batch), target) / k
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    If the block raises, the gathered statistics are dropped and nothing is updated. Layers in
    eval mode, with ``freeze_stats`` or without running statistics gather nothing, as usual.
    """
    ours: list[nn.Module] = []
    theirs: list[tuple[nn.Module, PopulationStats, bool]] = []
    hooks = []
    for _, bn in bn_layers(model):
        if isinstance(bn, _BatchNormMixin):
            if bn._deferred is not None:
                raise RuntimeError(
                    f"accumulate_statistics: {bn._where()} is already inside an "
                    "accumulate_statistics block"
                )
            bn._deferred = PopulationStats()
            ours.append(bn)
        else:
            acc = PopulationStats()
            theirs.append((bn, acc, bn.track_running_stats))
            hooks.append(bn.register_forward_pre_hook(_gather(acc)))
            bn.track_running_stats = False  # batch statistics, no update of the buffers
    try:
        yield
    except BaseException:
        for bn in ours:
            bn._deferred = None
        raise
    finally:
        for h in hooks:
            h.remove()
        for bn, _, track in theirs:
            bn.track_running_stats = track
    for bn in ours:
        acc, bn._deferred = bn._deferred, None
        if acc.batches:
            mean, var, count = _effective_batch(acc)
            bn._update_running_stats(mean, var, count)
    for bn, acc, _ in theirs:
        if acc.batches and bn.running_mean is not None:
            _update_torch_layer(bn, *_effective_batch(acc))


def _gather(acc: PopulationStats):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if module.training and not isinstance(x, torch.fx.Proxy) and x.numel() > x.shape[1]:
            with torch.no_grad():
                mean, var = moments(x.detach())
            acc.update(mean, var, x.numel() // x.shape[1])

    return hook


def _effective_batch(acc: PopulationStats) -> tuple[Tensor, Tensor, int]:
    """Mean, biased variance and size of the union of the micro-batches."""
    mean, unbiased = acc.pooled()
    n = acc.samples
    return mean, unbiased * ((n - 1) / n), n


def _update_torch_layer(bn: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    finite = bool(torch.isfinite(mean).all() & torch.isfinite(var).all())
    if not finite:
        warnings.warn(nonfinite_message(f"{type(bn).__name__}({bn.num_features})"), stacklevel=3)
        return
    update_running_stats(
        mean.to(bn.running_mean.device),
        var.to(bn.running_mean.device),
        count,
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
        None,
        bn.momentum,
        True,
    )
