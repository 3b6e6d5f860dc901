"""The portable training path: a ``torch.autograd.Function`` with the paper's closed-form gradient.

It runs on any device torch supports, and it is what the library uses on a CPU where the fused
kernels cannot be built (see :mod:`batchnorm.functional.kernels`). The forward computes the batch
statistics with ``torch.var_mean`` (a stable two-pass/Welford reduction, never E[x²] − E[x]²; in
float64 for float32 inputs, float32 for 16-bit ones) and saves only ``x``, ``mu_B`` and ``1/σ_B``. The backward is the Section 3 chain rule reduced to two
per-channel sums:

    dl/dx_i = γ · inv / m · (m g_i − Σ_j g_j − x̂_i Σ_j g_j x̂_j),   inv = 1/sqrt(σ²_B + ε)

When the caller asks for a graph of the backward itself (``create_graph=True``: gradient penalties,
``gradgradcheck``) the backward is instead written with differentiable torch ops that recompute the
statistics from ``x``, so the second derivative sees how μ_B and σ²_B depend on x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import reduce_dims

__all__ = ["BatchNormFunction", "composite_backward", "stats_dtype"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype this path computes in: float32 for 16-bit inputs, float64 otherwise.

    float64 for float32 inputs keeps ``x − μ_B`` exact when |μ_B| ≫ σ_B (e.g. 1e4 + N(0, 1)),
    matching the fused kernels' accuracy at the cost of a wider temporary: this is the portable
    fallback, not the fast path.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def composite_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dl/dx, dl/dγ, dl/dβ) in differentiable torch ops, statistics recomputed from ``x``.

    Used for double backward: every intermediate stays on the autograd graph.
    """
    dims = reduce_dims(x)
    acc = stats_dtype(x.dtype)
    xf, gf = x.to(acc), grad_y.to(acc)
    m = x.numel() // x.shape[1]
    var, mean = torch.var_mean(xf, dims, correction=0)
    inv = torch.rsqrt(var + eps)
    x_hat = (xf - _channel_view(mean, x.dim())) * _channel_view(inv, x.dim())
    sum_g = gf.sum(dims)
    sum_gx = (gf * x_hat).sum(dims)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(inv)
    k = _channel_view(gamma * inv / m, x.dim())
    grad_x = k * (m * gf - _channel_view(sum_g, x.dim()) - x_hat * _channel_view(sum_gx, x.dim()))
    return grad_x.to(x.dtype), sum_gx, sum_g


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN (Alg. 1). Returns ``(y, mu_B, var_B)``; only ``y`` is differentiable."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        dims = reduce_dims(x)
        acc = stats_dtype(x.dtype)
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dims, correction=0)  # Alg. 1, biased variance
        inv = torch.rsqrt(var + eps)
        scale = inv if weight is None else weight.to(acc) * inv
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        # Alg. 1 and Alg. 2 line 11 share this form: y = x · scale + shift per channel.
        y = torch.addcmul(_channel_view(shift, x.dim()), xf, _channel_view(scale, x.dim()))
        y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, inv)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x, weight, mean, inv = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            gx, gw, gb = composite_backward(grad_y, x, weight, ctx.eps)
        else:
            gx, gw, gb = _fast_backward(grad_y, x, weight, mean, inv, need_x)
        return (
            gx if need_x else None,
            gw.to(weight.dtype) if need_w else None,
            gb.to(weight.dtype if weight is not None else gb.dtype) if need_b else None,
            None,
        )


def _fast_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv: Tensor, need_x: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The two-reduction backward from saved μ_B and 1/σ_B (no graph)."""
    dims = reduce_dims(x)
    nd = x.dim()
    acc = mean.dtype
    xf, gf = x.to(acc), grad_y.to(acc)
    m = x.numel() // x.shape[1]
    centered = xf - _channel_view(mean, nd)
    sum_g = gf.sum(dims)  # dl/dbeta
    sum_gc = (gf * centered).sum(dims)
    sum_gx = sum_gc * inv  # dl/dgamma = sum g x_hat
    grad_x = None
    if need_x:
        gamma = weight.to(acc) if weight is not None else torch.ones_like(inv)
        k = gamma * inv / m
        # dl/dx = k (m g - sum g - x_hat sum g x_hat), with x_hat = centered * inv
        grad_x = _channel_view(k * m, nd) * gf - _channel_view(k * sum_g, nd)
        grad_x = grad_x - centered * _channel_view(k * sum_gx * inv, nd)
        grad_x = grad_x.to(x.dtype)
    return grad_x, sum_gx, sum_g
