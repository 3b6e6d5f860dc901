"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, arXiv:1705.08741).

Large-batch training loses the regularizing noise of BN's small-batch statistics. Ghost BN
normalizes each "ghost" batch of ``virtual_batch_size`` examples of a large batch with that ghost
batch's own statistics (Alg. 1 per ghost batch), as if the large batch had been several small ones.

Two choices, stated because implementations differ:

- Inference is BN's: the running statistics, one affine map per channel — ghost batching applies
  to training only (tf_keras applied ``virtual_batch_size`` at inference too, keras#15790).
- The running statistics get ONE update per training step, with the mean and unbiased variance of
  the whole batch (the union of the ghost batches, merged with Chan's formula in float64): they
  estimate the population, which is what inference normalizes with. (Updating once per ghost
  batch would multiply the effective momentum by the number of ghost batches.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional.core import _train
from ..functional.stats import Moments, merge_moments
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostMixin:
    """The Ghost BN forward on top of our BN layers; documented once, here.

    Args (beyond BN's, keyword-only):
        virtual_batch_size: examples per ghost batch (along dimension 0). The last ghost batch
            takes what is left; each must hold more than one value per channel. A batch no
            larger than it is normalized as one (plain BN).
    """

    def __init__(self, *args, virtual_batch_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(
                f"{self._where()}: virtual_batch_size must be a positive int, got "
                f"{virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise NotImplementedError(f"{self._where()}: Ghost BN does not take a mask")
        ghost = (
            self.training
            and not self.freeze_stats
            and not isinstance(input, torch.fx.Proxy)
            and input.shape[0] > self.virtual_batch_size
            and input.numel() > 0  # an empty batch: the plain layer's empty output
        )
        if not ghost:
            return super().forward(input)  # type: ignore[misc]
        self._check(input, True)
        outputs, moments = [], None
        for chunk in input.split(self.virtual_batch_size):
            m = chunk.numel() // chunk.shape[1]
            if m <= 1:
                raise ValueError(
                    f"{self._where()}: the last ghost batch of input {tuple(input.shape)} holds "
                    f"{chunk.shape[0]} example(s), one value per channel; use a batch size that "
                    f"leaves more than one example after dividing by {self.virtual_batch_size}"
                )
            y, mean, var = _train(  # Alg. 1 on this ghost batch, no running-statistics update
                chunk, self.weight, self.bias, None, None, None, None, self.eps, False, None, ""
            )
            outputs.append(y)
            chunk_moments = Moments.from_batch(mean, var, m)
            moments = chunk_moments if moments is None else merge_moments(moments, chunk_moments)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(moments.mean, moments.var, int(moments.count))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]


class GhostBatchNorm1d(_GhostMixin, BatchNorm1d):
    """Ghost BN over ``(N, C)`` or ``(N, C, L)`` inputs; see :class:`_GhostMixin`."""


class GhostBatchNorm2d(_GhostMixin, BatchNorm2d):
    """Ghost BN over ``(N, C, H, W)`` inputs; see :class:`_GhostMixin`."""


class GhostBatchNorm3d(_GhostMixin, BatchNorm3d):
    """Ghost BN over ``(N, C, D, H, W)`` inputs; see :class:`_GhostMixin`."""
