"""Training-mode BN whose statistics ignore masked (padded) positions.

Variable-length sequences are padded to a common length; plain BN counts the padding in its
batch statistics (and in the running statistics inference will use), so a batch's normalization
depends on how much padding it holds (pytorch#70529; Keras and Flax take a ``mask``). Here the
statistics of Alg. 1 are taken over the valid positions only:

    μ_B = Σ_valid x / m_valid,   σ²_B = Σ_valid (x − μ_B)² / m_valid,

and every position is normalized with them (the outputs at padded positions are defined but
meaningless: mask them downstream as usual). Gradients follow by autograd: a padded input gets
only its direct path γ/σ_B · dl/dy, since the statistics do not depend on it.

This is the portable path (torch ops, float64 for float32 inputs), not the fused kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import reduce_dims
from .steps import compute_dtype

__all__ = ["check_mask", "masked_batch_norm_train"]


def check_mask(x: Tensor, mask: Tensor, where: str) -> Tensor:
    """The mask as a bool tensor broadcastable against ``x`` (N, C, *rest): shape (N, *rest)."""
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{where}: mask must have the input's shape without the channel dimension, "
            f"{expected} for input {tuple(x.shape)}, got {got}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be a bool tensor (True = valid), got {mask.dtype}")
    return mask.to(x.device).unsqueeze(1)


def masked_batch_norm_train(
    x: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    where: str = "masked batch_norm",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Alg. 1 over the positions where ``mask`` is True. Returns ``(y, mean, var, m_valid)``:
    the output for every position, the float64 statistics (biased variance) and the number of
    valid values per channel."""
    valid = check_mask(x, mask, where)
    m = int(valid.sum())
    if m <= 1:
        raise ValueError(
            f"{where}: Expected more than 1 valid value per channel when training, got {m} "
            f"(input {tuple(x.shape)}); a batch needs at least two unmasked positions"
        )
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    w = valid.to(acc)
    dims = reduce_dims(x)
    mean = (xf * w).sum(dims, keepdim=True) / m  # Alg. 1 over the valid positions
    centered = xf - mean
    var = (centered * centered * w).sum(dims, keepdim=True) / m  # biased
    y = centered * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc).reshape(mean.shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(mean.shape)
    return y.to(x.dtype), mean.detach().double().flatten(), var.detach().double().flatten(), m
