"""The portable training path: a ``torch.autograd.Function`` with the paper's closed-form gradient.

It runs on any device torch supports, and it is what the library uses on a CPU where the fused
kernels cannot be built (see :mod:`batchnorm.functional.kernels`). It is made of the portable
steps of :mod:`batchnorm.functional.steps`: the forward computes the batch statistics with
``torch.var_mean`` (a stable reduction, never E[x²] − E[x]²) and saves only ``x``, ``mu_B`` and
``var_B``; the backward is the Section 3 chain rule reduced to two per-channel sums:

    dl/dx_i = γ · inv / m · (m g_i − Σ_j g_j − x̂_i Σ_j g_j x̂_j),   inv = 1/sqrt(σ²_B + ε)

When the caller asks for a graph of the backward itself (``create_graph=True``: gradient penalties,
``gradgradcheck``) the backward is instead written with differentiable torch ops that recompute the
statistics from ``x``, so the second derivative sees how μ_B and σ²_B depend on x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import reduce_dims
from .steps import (
    compute_dtype,
    torch_backward_elementwise,
    torch_backward_reduce,
    torch_moments,
    torch_normalize,
)

__all__ = ["BatchNormFunction", "composite_backward", "forward_tangent"]


def composite_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dl/dx, dl/dγ, dl/dβ) in differentiable torch ops, statistics recomputed from ``x``.

    Used for double backward: every intermediate stays on the autograd graph.
    """
    dims = reduce_dims(x)
    acc = compute_dtype(x.dtype)
    xf, gf = x.to(acc), grad_y.to(acc)
    m = x.numel() // x.shape[1]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    var, mean = torch.var_mean(xf, dims, correction=0)
    inv = torch.rsqrt(var + eps)
    x_hat = (xf - mean.reshape(shape)) * inv.reshape(shape)
    sum_g = gf.sum(dims)
    sum_gx = (gf * x_hat).sum(dims)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(inv)
    k = (gamma * inv / m).reshape(shape)
    grad_x = k * (m * gf - sum_g.reshape(shape) - x_hat * sum_gx.reshape(shape))
    return grad_x.to(x.dtype), sum_gx, sum_g


def forward_tangent(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    x_t: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
) -> Tensor:
    """Forward-mode AD: the tangent of y = γ x̂ + β for tangents of x, γ, β (None: zero), with the
    batch statistics ``mean``/``var`` of ``x``:

        ẏ = γ · inv · (ẋ − mean(ẋ) − x̂ · mean(ẋ x̂)) + γ̇ x̂ + β̇    (means over each channel's m values)

    The same formula as ``set_forward_tangent`` in csrc/batchnorm_cpu.cpp (the fused kernels'
    autograd cannot call Python); gradcheck with forward AD checks both.
    """
    dims = reduce_dims(x)
    acc = compute_dtype(x.dtype)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    inv = torch.rsqrt(var + eps).to(acc).reshape(shape)
    x_hat = (x.to(acc) - mean.to(acc).reshape(shape)) * inv
    y_t = torch.zeros_like(x_hat)
    if x_t is not None:
        t = x_t.to(acc)
        dx_hat = inv * (
            t - t.mean(dims, keepdim=True) - x_hat * (t * x_hat).mean(dims, keepdim=True)
        )
        y_t = y_t + (dx_hat if weight is None else weight.to(acc).reshape(shape) * dx_hat)
    if weight_t is not None:
        y_t = y_t + weight_t.to(acc).reshape(shape) * x_hat
    if bias_t is not None:
        y_t = y_t + bias_t.to(acc).reshape(shape)
    return y_t.to(x.dtype)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN (Alg. 1). Returns ``(y, mu_B, var_B)`` (float64 statistics); only ``y`` is
    differentiable."""

    generate_vmap_rule = True  # every step is plain torch ops: torch.func.vmap batches them

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = torch_moments(x)  # Alg. 1: mu_B and the biased var_B
        y = torch_normalize(x, mean, var, weight, bias, eps)  # Alg. 1: normalize, scale, shift
        return y, mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate from forward, for torch.func
        x, weight, _, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps_t):
        x, weight, mean, var = ctx.saved_tensors
        y_t = forward_tangent(x, weight, mean, var, ctx.eps, x_t, weight_t, bias_t)
        return y_t, None, None

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            gx, gw, gb = composite_backward(grad_y, x, weight, ctx.eps)
        else:
            sum_g, sum_gc = torch_backward_reduce(grad_y, x, mean)
            gw = sum_gc * torch.rsqrt(var + ctx.eps)  # dl/dgamma = sum g x_hat
            gb = sum_g  # dl/dbeta = sum g
            gx = None
            if need_x:
                gx = torch_backward_elementwise(
                    grad_y, x, mean, var, weight, sum_g, sum_gc, x.numel() // x.shape[1], ctx.eps
                )
        param_dtype = weight.dtype if weight is not None else x.dtype
        return (
            gx if need_x else None,
            gw.to(param_dtype) if need_w else None,
            gb.to(param_dtype) if need_b else None,
            None,
        )
