"""Validation and dispatch of the BN transform (Algorithm 1 in training, Algorithm 2 line 11 in eval).

Three backends compute the same thing (see :mod:`batchnorm.functional.backend`): the fused C++ CPU
kernels, the portable :class:`~batchnorm.functional.autograd.BatchNormFunction`, and PyTorch's own
``F.batch_norm`` (every non-CPU device).

Inference mode always uses ``F.batch_norm``: it is one fused multiply-add per element, already at
memory bandwidth, and it exports to ONNX as a ``BatchNormalization`` node.

All backends return batch statistics in float64, update running statistics with torch's rule and
refuse to write non-finite batch statistics into them (see :func:`batch_norm_train`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .autograd import BatchNormFunction
from .backend import BACKENDS, current_backend, fused_eager, select_backend, use_backend
from .reference import reduce_dims

__all__ = [
    "BACKENDS",
    "BatchStats",
    "batch_norm",
    "batch_norm_train",
    "check_hyperparameters",
    "check_input",
    "current_backend",
    "select_backend",
    "update_running_stats",
    "use_backend",
]


class BatchStats(NamedTuple):
    """Output of a training-mode BN call: ``y`` and the batch's float64 mean and biased variance."""

    output: Tensor
    mean: Tensor
    var: Tensor


def check_input(
    x: Tensor, num_features: int | None, training: bool, where: str = "batch_norm"
) -> None:
    """Raise a clear error for inputs no BN layer can process (dims, channels, dtype, m)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, ...) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{where}: expected a floating-point input (float32, float64, float16 or bfloat16), "
            f"got {x.dtype}; convert it first, e.g. x.float()"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{where}: expected {num_features} channels in dimension 1 of the input, got shape "
            f"{tuple(x.shape)} ({x.shape[1]} channels). Is the layer's num_features right, or "
            "is the channel dimension somewhere else (BN expects (N, C, ...))?"
        )
    # An empty batch (m = 0) passes, as in torch: an empty output, running statistics untouched.
    if training and x.numel() == x.shape[1] != 0:  # m = 1
        raise ValueError(
            f"{where}: Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}. Batch statistics (Alg. 1) need m > 1 values per channel: use a "
            "larger batch, drop_last=True in the DataLoader, or put the layer in eval mode."
        )


def check_hyperparameters(eps: float, momentum: float | None, where: str = "batch_norm") -> None:
    if not eps > 0:  # also rejects NaN
        raise ValueError(f"{where}: eps must be > 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{where}: momentum must be in [0, 1] (torch's convention: new = (1 - momentum) · old "
            f"+ momentum · batch) or None for a cumulative average, got {momentum}. Keras/Flax "
            "'momentum=0.99' is torch's momentum=0.01."
        )


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    guard_nonfinite: bool = True,
    nonfinite_count: Tensor | None = None,
    name: str = "",
) -> BatchStats:
    """Training-mode BN (Algorithm 1) with an optional running-statistics update in the same call.

    Normalizes each channel of ``input`` (N, C, *spatial) over the m = N·∏spatial values of the
    batch with the biased variance, then applies ``weight`` (γ) and ``bias`` (β). If running
    buffers are given they are updated with torch's rule, with the unbiased variance:
    ``new = (1 − f) · old + f · batch``, f = ``momentum``, or f = 1/``num_batches_tracked`` after
    its increment when ``momentum`` is None (cumulative average).

    With ``guard_nonfinite`` (default) a batch whose statistics are not finite leaves the running
    buffers and ``num_batches_tracked`` untouched and warns (``name`` says which layer); with a
    ``nonfinite_count`` counter it adds one to it and warns only when it first becomes 1.
    Returns ``(output, mean, var)``, statistics in float64.
    """
    check_input(input, None, training=True, where=name or "batch_norm_train")
    check_hyperparameters(eps, momentum, where=name or "batch_norm_train")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("batch_norm_train: momentum=None (cumulative) needs num_batches_tracked")
    return _train(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        guard_nonfinite,
        nonfinite_count,
        name,
    )


def _train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    guard: bool,
    nonfinite_count: Tensor | None,
    describe: str | Callable[[], str],
) -> BatchStats:
    """The unchecked training call: inputs were validated by the caller.

    ``describe`` names the layer in the non-finite warning; a callable is only called then.
    """
    if x.numel() == 0:  # an empty batch, as torch: an empty output, no statistics, no update
        nan = torch.full((x.shape[1],), float("nan"), dtype=torch.float64, device=x.device)
        return BatchStats(
            F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), nan, nan.clone()
        )
    if fused_eager(x) or (select_backend(x) == "fused" and not torch.compiler.is_compiling()):
        y, mean, var, skipped = fused_entry()(  # the common case: the kernels, eagerly
            x,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            nonfinite_count,
            momentum,
            eps,
            guard,
        )
    elif (backend := select_backend(x)) == "fused":  # under torch.compile: the registered op
        y, mean, var = torch.ops.batchnorm.train_forward(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            nonfinite_count,
            momentum,
            eps,
            guard,
        )
        skipped = False
    else:
        if backend == "python":
            y, mean, var = BatchNormFunction.apply(x, weight, bias, eps)
        else:
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
            with torch.no_grad():  # PyTorch's own numerics here; 16-bit inputs reduced in float32
                xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                var, mean = torch.var_mean(xs, reduce_dims(x), correction=0)
                mean, var = mean.double(), var.double()
        update_running_stats(
            mean,
            var,
            x.numel() // x.shape[1],
            running_mean,
            running_var,
            num_batches_tracked,
            nonfinite_count,
            momentum,
            guard,
        )
        # Only on CPU: reading a CUDA value would synchronize every step.
        skipped = (
            guard
            and (running_mean is not None or running_var is not None)
            and x.is_cpu
            and not bool(torch.isfinite(mean).all() & torch.isfinite(var).all())
        )
    if skipped:
        warn_skip(nonfinite_count, describe)
    return BatchStats(y, mean, var)


def warn_skip(nonfinite_count: Tensor | None, describe: str | Callable[[], str]) -> None:
    """The non-finite guard skipped an update: warn on a layer's first skip (its counter just
    became 1), or on every skip without a counter. Points at the caller of ``_train``'s caller."""
    if nonfinite_count is None or int(nonfinite_count) == 1:
        warnings.warn(
            nonfinite_message(describe if isinstance(describe, str) else describe()),
            UserWarning,
            stacklevel=4,
        )


@functools.cache
def fused_entry() -> Callable:
    """The fused kernels' eager entry point (looked up once: this sits on every training step)."""
    return kernels.module().train_forward


@torch.no_grad()
def update_running_stats(
    mean: Tensor,
    var: Tensor,
    m: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    nonfinite_count: Tensor | None,
    momentum: float | None,
    guard: bool,
) -> None:
    """torch's running-statistics rule with the non-finite guard, for the backends without the
    fused kernels (which do the same in C++): skipped steps only add one to ``nonfinite_count``."""
    if running_mean is None and running_var is None:
        return
    # Written without host syncs (no .item(), no Python branch on tensor values), so that on
    # CUDA the guard costs a few tiny kernels and never stalls the stream.
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if not guard:
        finite = torch.ones_like(finite)
    elif nonfinite_count is not None:
        nonfinite_count.add_((~finite).to(nonfinite_count.dtype))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    if momentum is not None:
        factor = torch.full((), momentum, dtype=torch.float64, device=mean.device)
    else:  # cumulative average: 1 / num_batches_tracked after its increment
        factor = 1.0 / num_batches_tracked.clamp(min=1).double()
    if running_mean is not None:
        new_mean = torch.lerp(running_mean.double(), mean, factor)
        running_mean.copy_(torch.where(finite, new_mean, running_mean))
    if running_var is not None:  # running_var stores the unbiased variance (Alg. 2 line 10)
        new_var = torch.lerp(running_var.double(), var * (m / (m - 1)), factor)
        running_var.copy_(torch.where(finite, new_var, running_var))


def nonfinite_message(name: str) -> str:
    return (
        f"{name or 'batch norm'}: the batch statistics of a training step were not finite (NaN "
        "or inf in the input, or an overflow); running_mean/running_var were NOT updated. Skipped "
        "steps are counted in the layer's `nonfinite_skips` buffer; this warning is shown the "
        "first time only. Pass guard_nonfinite=False to update anyway."
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm` (same arguments, same results).

    ``training=True`` runs Algorithm 1 through the selected backend and, if running buffers are
    given, updates them with factor ``momentum`` (guarding against non-finite statistics);
    ``training=False`` applies Algorithm 2 line 11 with ``running_mean``/``running_var``.
    """
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm: inference mode (training=False) needs running_mean and running_var"
            )
        check_input(input, None, training=False)
        check_hyperparameters(eps, None)
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    return batch_norm_train(
        input,
        weight,
        bias,
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
        eps=eps,
    ).output
