"""The BN transform written line by line from the paper: the oracle every fast path is tested against.

Ioffe & Szegedy, *Batch Normalization*, arXiv:1502.03167. Nothing here is fast or clever on purpose:
each line names the equation of Algorithm 1, Section 3 or Algorithm 2 that it implements, and the
functions are meant to be called in float64 by the tests. Shapes follow torch: the input is
``(N, C, *spatial)`` and statistics are per channel ``C`` over every other dimension, so for a
feature map of size p × q the effective mini-batch is m = N·p·q (Sec. 3.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "paper_population_statistics",
    "reduce_dims",
]


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions a BN statistic is reduced over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``x`` of shape (N, C, ...)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def batch_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 for a mini-batch. Returns ``(y, mu_b, var_b)``, with ``var_b`` biased (divides by m)."""
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    mu_b = x.sum(dims) / m  # Alg. 1: mu_B = 1/m sum_i x_i
    var_b = ((x - _per_channel(mu_b, x)) ** 2).sum(
        dims
    ) / m  # Alg. 1: var_B = 1/m sum (x_i - mu_B)^2
    x_hat = (x - _per_channel(mu_b, x)) / torch.sqrt(
        _per_channel(var_b, x) + eps
    )  # Alg. 1: normalize
    y = x_hat  # Alg. 1: y_i = gamma x_hat_i + beta (gamma = 1, beta = 0 when absent)
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y, mu_b, var_b


def batch_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The chain rule of Section 3, unsimplified. Returns ``(dl/dx, dl/dgamma, dl/dbeta)``."""
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    _, mu_b, var_b = batch_norm_forward(x, None, None, eps)
    mu = _per_channel(mu_b, x)
    var = _per_channel(var_b, x)
    x_hat = (x - mu) / torch.sqrt(var + eps)
    gamma = _per_channel(weight, x) if weight is not None else torch.ones_like(var)

    d_xhat = grad_y * gamma  # dl/dx_hat_i = dl/dy_i * gamma
    d_var = (d_xhat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(dims, keepdim=True)  # dl/dvar_B
    d_mu = (d_xhat * -1 / torch.sqrt(var + eps)).sum(dims, keepdim=True) + d_var * (
        -2 * (x - mu)
    ).sum(dims, keepdim=True) / m  # dl/dmu_B
    d_x = d_xhat / torch.sqrt(var + eps) + d_var * 2 * (x - mu) / m + d_mu / m  # dl/dx_i
    d_gamma = (grad_y * x_hat).sum(dims)  # dl/dgamma = sum_i dl/dy_i x_hat_i
    d_beta = grad_y.sum(dims)  # dl/dbeta = sum_i dl/dy_i
    return d_x, d_gamma, d_beta


def batch_norm_inference(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Algorithm 2 line 11: one fixed affine map per channel from the population statistics."""
    gamma = weight if weight is not None else torch.ones_like(var)
    beta = bias if bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + eps)  # gamma / sqrt(Var[x] + eps)
    shift = beta - scale * mean  # beta - gamma E[x] / sqrt(Var[x] + eps)
    return x * _per_channel(scale, x) + _per_channel(shift, x)


def paper_population_statistics(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Algorithm 2 lines 9–10 over mini-batches of one size m: ``E[x] = E_B[mu_B]``,
    ``Var[x] = m/(m-1) · E_B[var_B]``."""
    ms = {b.numel() // b.shape[1] for b in batches}
    if len(ms) != 1:
        raise ValueError(
            f"the paper's estimate assumes one mini-batch size m, got sizes {sorted(ms)}"
        )
    m = ms.pop()
    stats = [batch_norm_forward(b, None, None, eps=0.0)[1:] for b in batches]
    mean = torch.stack([mu for mu, _ in stats]).mean(0)  # E[x] <- E_B[mu_B]
    var = m / (m - 1) * torch.stack([v for _, v in stats]).mean(0)  # Var[x] <- m/(m-1) E_B[var_B]
    return mean, var
