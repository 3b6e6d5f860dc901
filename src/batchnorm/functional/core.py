"""Validation and dispatch of the BN transform (Algorithm 1 in training, Algorithm 2 line 11 in eval).

Three backends compute the same thing (see :mod:`batchnorm.functional.backend`): the fused C++ CPU
kernels, the portable :class:`~batchnorm.functional.autograd.BatchNormFunction`, and PyTorch's own
``F.batch_norm`` (every non-CPU device).

Inference mode always uses ``F.batch_norm``: it is one fused multiply-add per element, already at
memory bandwidth, and it exports to ONNX as a ``BatchNormalization`` node.

All backends return batch statistics in float64, update running statistics with torch's rule and
refuse to write non-finite batch statistics into them (see :func:`batch_norm_train`).

Tensor subclasses (``__torch_dispatch__`` wrappers such as DTensor, FSDP2's and functorch-style
wrappers; ``__torch_function__`` subclasses) and calls whose tensors are not all on the input's
device (a buffer left on ``meta`` after meta-device construction) take PyTorch's own
``F.batch_norm`` with torch's running-statistics update: the kernels need plain tensors with data
(see :func:`plain`, and ``fusable`` in csrc/batchnorm_cpu.cpp).

Errors: inputs and arguments that torch rejects are rejected here too, with messages that name the
layer and the shape. Where torch's kernels raise a ``RuntimeError`` (a channel count that does not
match the running statistics) or ``NotImplementedError`` (an integer input), the error raised here
is also an instance of that class (:class:`BatchNormInputError`, :class:`BatchNormDtypeError`), so
code written against torch keeps catching it.
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
    "BatchNormDimensionError",
    "BatchNormDtypeError",
    "BatchNormInputError",
    "BatchStats",
    "batch_norm",
    "batch_norm_train",
    "check_hyperparameters",
    "check_input",
    "check_momentum",
    "check_per_channel",
    "current_backend",
    "plain",
    "select_backend",
    "update_running_stats",
    "use_backend",
]


class BatchNormInputError(ValueError, RuntimeError):
    """A BN call refused its input or an argument's shape (channels, sizes, missing statistics).

    A ``ValueError`` (this library's type for a bad argument, and torch.nn's for an input with the
    wrong number of dimensions) and a ``RuntimeError`` (what PyTorch's kernels raise for, e.g.,
    running statistics of the wrong size), so that ``except`` clauses written for either catch it,
    as numpy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``."""


class BatchNormDimensionError(BatchNormInputError, IndexError):
    """An input with fewer than the two dimensions (N, C) that BN needs (torch's functional form
    raises an ``IndexError`` for some of them)."""


class BatchNormDtypeError(TypeError, NotImplementedError):
    """A non-floating-point input (torch raises ``NotImplementedError``: "not implemented for
    'Long'")."""


_PLAIN = (Tensor, torch.nn.Parameter)


def plain(*tensors: Tensor | None) -> bool:
    """Whether every tensor given (``None`` skipped) is a plain ``torch.Tensor`` or ``Parameter``,
    not a tensor subclass: only those may reach the fused kernels."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


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
        raise BatchNormDimensionError(
            f"{where}: expected an input of shape (N, C, ...) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise BatchNormDtypeError(
            f"{where}: expected a floating-point input (float32, float64, float16 or bfloat16), "
            f"got {x.dtype}; convert it first, e.g. x.float()"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise BatchNormInputError(
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


def check_per_channel(x: Tensor, where: str, **tensors: Tensor | None) -> None:
    """Raise if a per-channel argument (running statistics, γ, β) does not hold one value per
    channel of ``x`` (torch's kernels raise a ``RuntimeError`` there)."""
    c = x.shape[1]
    for name, t in tensors.items():
        if t is not None and t.numel() != c:
            raise BatchNormInputError(
                f"{where}: {name} should contain {c} elements (one per channel of the input of "
                f"shape {tuple(x.shape)}), not {t.numel()} (shape {tuple(t.shape)})"
            )


def check_hyperparameters(
    eps: float, momentum: float | None, where: str = "batch_norm", training: bool = True
) -> None:
    """torch's rule for ``eps``: positive in training (a constant channel would divide by zero),
    non-negative otherwise; NaN never (torch would return NaN outputs silently). ``momentum``
    (pass None where no running statistics are updated): in [0, 1]."""
    if eps != eps:
        raise ValueError(f"{where}: eps must be a number, got {eps} (every output would be NaN)")
    if training and not eps > 0:
        raise ValueError(
            f"{where}: eps must be positive during training, got {eps}: with eps = 0 a channel "
            "whose batch values are all equal divides by zero"
        )
    if not eps >= 0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")
    check_momentum(momentum, where)


def check_momentum(momentum: float | None, where: str = "batch_norm") -> None:
    """``momentum`` in [0, 1] (or None): anything else is always a user error (an extrapolating
    "average"; a Keras-style 0.99 meant as torch's 0.01)."""
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
    where = name or "batch_norm_train"
    check_input(input, None, training=True, where=where)
    updates = running_mean is not None or running_var is not None
    check_hyperparameters(eps, momentum if updates else None, where=where)
    check_per_channel(
        input, where, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
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
    if not plain(x, weight, bias, running_mean, running_var, num_batches_tracked):
        return torch_train(
            x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
        )
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
        if y is None:  # refused: a tensor on another device than the CPU input (e.g. meta)
            return torch_train(
                x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
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
            y = _native_train_output(x, weight, bias, eps)
            with torch.no_grad():  # PyTorch's own numerics here; 16-bit inputs reduced in float32
                # (detached: no_grad does not stop forward-mode AD, whose tangents must not reach
                # the running statistics)
                xs = x.detach()
                xs = xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs
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
        # Only on CPU: reading a CUDA value would synchronize every step; not while
        # torch.compile traces (a data-dependent branch; the fused op does not warn there either)
        skipped = (
            guard
            and (running_mean is not None or running_var is not None)
            and x.is_cpu
            and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(mean).all() & torch.isfinite(var).all())
        )
    if skipped:
        warn_skip(nonfinite_count, describe)
    return BatchStats(y, mean, var)


def _native_train_output(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """The "native" backend's output: PyTorch's F.batch_norm, with two DEVIATIONs so that every
    backend computes the same function:

    - 16-bit CPU inputs are normalized in float32: torch's CPU kernel loses the statistics when
      |mean| >> std (bfloat16 [-50, -50.25] comes out [0, -1.41] instead of [1, -1]);
    - γ/β of another dtype than the input (a float64 input to a float32 layer), which torch's CPU
      kernel refuses ("mixed dtype") and the fused kernels accept, are cast to the compute dtype
      (16-bit inputs with float32 γ/β, which torch accepts everywhere, stay as they are).
    """
    half = (torch.float16, torch.bfloat16)
    xc = x.float() if x.is_cpu and x.dtype in half else x

    def cast(t: Tensor | None) -> Tensor | None:
        if t is None or t.dtype == xc.dtype or (xc.dtype in half and t.dtype == torch.float32):
            return t
        return t.to(xc.dtype)

    w, b = cast(weight), cast(bias)
    return F.batch_norm(xc, None, None, w, b, True, 0.0, eps).to(x.dtype)


def torch_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> BatchStats:
    """A training call through PyTorch's own ``F.batch_norm`` and torch's running-statistics rule,
    exactly as ``torch.nn.BatchNorm*`` runs it (``num_batches_tracked`` counts every call, the
    cumulative factor is 1/num_batches_tracked; no non-finite guard).

    For tensor subclasses, whose dispatch (DTensor's sharding rules, a wrapper's
    ``__torch_dispatch__``, ``__torch_function__`` overrides) only PyTorch's ops go through, and for
    tensors on different devices, which torch's op reports."""
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None and (running_mean is not None or running_var is not None):
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, eps)
    if x.numel() == 0:
        nan = torch.full((x.shape[1],), float("nan"), dtype=torch.float64, device=x.device)
        return BatchStats(y, nan, nan.clone())
    with torch.no_grad():
        xs = x.detach()
        xs = xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs
        var, mean = torch.var_mean(xs, reduce_dims(x), correction=0)
    return BatchStats(y, mean.double(), var.double())


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
        "steps are counted in the layer's `nonfinite_skips` counter; this warning is shown the "
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

    Tensor subclasses go to :func:`torch.nn.functional.batch_norm` itself (their
    ``__torch_function__`` / ``__torch_dispatch__`` see torch's op), and so do inputs without
    values of fewer than two dimensions (torch returns an empty output for shape ``(0,)``).
    """
    if not plain(input, running_mean, running_var, weight, bias) or (
        isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0
    ):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        check_input(input, None, training=False)
        if running_mean is None or running_var is None:
            raise BatchNormInputError(
                "batch_norm: inference mode (training=False) needs running_mean and running_var"
            )
        check_hyperparameters(eps, None, training=False)
        check_per_channel(
            input,
            "batch_norm",
            running_mean=running_mean,
            running_var=running_var,
            weight=weight,
            bias=bias,
        )
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must either both be None or neither be None"
        )
    return batch_norm_train(
        input,
        weight,
        bias,
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
        eps=eps,
    ).output
