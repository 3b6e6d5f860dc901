"""Training-mode BN in four steps, for callers that combine statistics from several places.

SyncBatchNorm merges each process's moments before normalizing and sums the two backward
reductions across processes; recalibration needs only the moments. The steps are:

1. :func:`moments` — per-channel mean and biased variance (Alg. 1), float64;
2. :func:`normalize` — y = γ (x − mean) / sqrt(var + ε) + β with given statistics;
3. :func:`backward_reduce` — the backward's two per-channel sums, Σ g and Σ g (x − mean);
4. :func:`backward_elementwise` — dl/dx from (possibly global) sums over ``count`` values:
   dl/dx = γ·inv · (g − Σg/count − (x − mean)·inv²·Σg(x − mean)/count), inv = 1/sqrt(var + ε).

On CPU they run the same fused kernels as the one-call training path; elsewhere (and on the
portable path) they are torch ops computed in float64 for float32 inputs (float32 for 16-bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import select_backend
from .reference import reduce_dims

__all__ = [
    "backward_elementwise",
    "backward_reduce",
    "compute_dtype",
    "moments",
    "normalize",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the portable steps compute in: float32 for 16-bit inputs, float64 otherwise.

    float64 for float32 inputs keeps ``x − mean`` exact when |mean| ≫ std (e.g. 1e4 + N(0, 1)),
    matching the fused kernels' accuracy at the cost of a wider temporary.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _fused(x: Tensor) -> bool:
    return select_backend(x) == "fused"


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``x`` (N, C, ...) in float64."""
    if _fused(x):
        return torch.ops.batchnorm.moments(x)
    return torch_moments(x)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """y = γ (x − mean) / sqrt(var + ε) + β per channel, in the dtype and layout of ``x``."""
    if _fused(x):
        return torch.ops.batchnorm.normalize(x, mean, var, weight, bias, eps)
    return torch_normalize(x, mean, var, weight, bias, eps)


def backward_reduce(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (Σ g, Σ g (x − mean)) in float64."""
    if _fused(x):
        return torch.ops.batchnorm.backward_reduce(grad_y, x, mean)
    return torch_backward_reduce(grad_y, x, mean)


def backward_elementwise(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    sum_g: Tensor,
    sum_gc: Tensor,
    count: int,
    eps: float,
) -> Tensor:
    """dl/dx from the statistics and the two sums over ``count`` values (see the module docstring)."""
    if _fused(x):
        return torch.ops.batchnorm.backward_elementwise(
            grad_y, x, mean, var, weight, sum_g, sum_gc, count, eps
        )
    return torch_backward_elementwise(grad_y, x, mean, var, weight, sum_g, sum_gc, count, eps)


# -- the portable implementations ---------------------------------------------------------------


def torch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), reduce_dims(x), correction=0)
    return mean.double(), var.double()


def torch_normalize(x, mean, var, weight, bias, eps):
    acc = compute_dtype(x.dtype)
    inv = torch.rsqrt(var.to(acc) + eps)
    scale = inv if weight is None else weight.to(acc) * inv
    shift = -mean.to(acc) * scale if bias is None else bias.to(acc) - mean.to(acc) * scale
    y = torch.addcmul(_channel(shift, x.dim()), x.to(acc), _channel(scale, x.dim()))
    return y.to(x.dtype)


def torch_backward_reduce(grad_y, x, mean):
    acc = compute_dtype(x.dtype)
    g = grad_y.to(acc)
    centered = x.to(acc) - _channel(mean.to(acc), x.dim())
    dims = reduce_dims(x)
    return g.sum(dims).double(), (g * centered).sum(dims).double()


def torch_backward_elementwise(grad_y, x, mean, var, weight, sum_g, sum_gc, count, eps):
    acc = compute_dtype(x.dtype)
    nd = x.dim()
    inv = torch.rsqrt(var.to(acc) + eps)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(inv)
    k1 = gamma * inv
    k2 = k1 * inv * inv * sum_gc.to(acc) / count
    k3 = k1 * sum_g.to(acc) / count
    centered = x.to(acc) - _channel(mean.to(acc), nd)
    dx = _channel(k1, nd) * grad_y.to(acc) - (centered * _channel(k2, nd) + _channel(k3, nd))
    return dx.to(x.dtype)
