"""Batch Renormalization (Ioffe, 2017, arXiv:1702.03275): BN that also works for small or
non-i.i.d. mini-batches.

BN trains on batch statistics and infers with population statistics; when a mini-batch is small
or unrepresentative the two differ, and the network is trained on activations it will never see
at inference. Batch Renorm corrects the batch-normalized activation towards what the moving
averages would give:

    x̂ = (x − μ_B) / σ_B,   y = γ (r·x̂ + d) + β,
    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max),

with σ_B = sqrt(σ²_B + ε), σ = sqrt(running_var + ε), μ = running_mean, and r, d treated as
constants in backprop (the gradient flows through μ_B and σ_B as in BN). With r = 1, d = 0 it is
BN. The paper trains with r_max = 1, d_max = 0 at first and relaxes them to 3 and 5; here
``warmup`` steps of plain BN followed by the given bounds, and both bounds are attributes a
training loop may change at any step.

Inference is BN's (Alg. 2 line 11 with the running statistics); parameters and buffers are BN's,
so checkpoints load into ``torch.nn.BatchNorm*`` and back.

With ``virtual_batch_size`` the batch is normalized in ghost batches (as
:mod:`batchnorm.nn.ghost`'s Ghost BN), each with its own statistics and its own r and d: Batch
Renorm as it is meant for, statistics from a few examples, inside one larger batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional.core import _train, check_hyperparameters
from ..functional.stats import Moments, merge_moments
from ..functional.steps import moments
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _RenormMixin:
    """The Batch Renorm forward on top of our BN layers; documented once, here.

    Args (beyond BN's, keyword-only):
        r_max: bound of the scale correction r, ≥ 1 (1 turns it off). Default 3 (the paper's final).
        d_max: bound of the shift correction d, in running standard deviations, ≥ 0 (0 turns it
            off). Default 5 (the paper's final).
        warmup: training steps (counted by ``num_batches_tracked``) of plain BN before the
            corrections apply, while the moving averages settle (the paper starts at r_max = 1,
            d_max = 0). Default 0.
        virtual_batch_size: examples per ghost batch (along dimension 0), or None (default: the
            whole batch). Each ghost batch is normalized with its own statistics and corrected
            with its own r and d; the moving averages get one update per step with the whole
            batch's mean and variance (as Ghost BN's). The last ghost batch takes what is left
            and must hold more than one value per channel.

    The moving averages are updated from the *batch* statistics (as in BN), with the layer's
    ``momentum``; the paper uses a small one. Needs ``track_running_stats=True``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: int = 0,
        virtual_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        if not track_running_stats:
            raise ValueError(
                f"{self._where()}: Batch Renorm corrects towards the running statistics, so it "
                "needs track_running_stats=True"
            )
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self._check_bounds()
        vbs = virtual_batch_size
        if vbs is not None and (not isinstance(vbs, int) or isinstance(vbs, bool) or vbs < 1):
            raise ValueError(
                f"{self._where()}: virtual_batch_size must be a positive int or None, got {vbs!r}"
            )
        self.virtual_batch_size = vbs

    def _check_bounds(self) -> None:
        if not self.r_max >= 1 or not self.d_max >= 0 or self.warmup < 0:
            raise ValueError(
                f"{self._where()}: Batch Renorm needs r_max >= 1, d_max >= 0 and warmup >= 0, got "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup={self.warmup}"
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise NotImplementedError(f"{self._where()}: Batch Renorm does not take a mask")
        renorm = (
            self.training
            and not self.freeze_stats
            and self.running_mean is not None
            and not self._population_mode
            and self._deferred is None
            and not isinstance(input, torch.fx.Proxy)
        )
        if not renorm:
            return super().forward(input)  # type: ignore[misc]
        self._check(input, True)
        self._check_bounds()
        check_hyperparameters(self.eps, self.momentum, self._where())
        vbs = self.virtual_batch_size
        if vbs is not None and input.shape[0] > vbs and input.numel():
            return self._ghost(input, vbs)
        weight, bias = self._corrected(input)
        return _train(
            input,
            weight,
            bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.momentum,
            self.eps,
            self.guard_nonfinite,
            self._counter(input),
            self._where,
        ).output

    def _corrected(self, input: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """BN's scale and shift for ``input``'s batch: γ·r and β + γ·d after the warmup (r, d
        constants), γ and β before."""
        weight, bias = self.weight, self.bias
        if input.numel() and int(self.num_batches_tracked) >= self.warmup:  # (empty: no r, d)
            with torch.no_grad():
                mean_b, var_b = moments(input)  # float64, the same kernel the forward runs
                sigma = torch.sqrt(self.running_var.double() + self.eps)
                r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1 / self.r_max, self.r_max)
                d = ((mean_b - self.running_mean.double()) / sigma).clamp(-self.d_max, self.d_max)
            dtype = weight.dtype if weight is not None else torch.float32
            gamma = weight if weight is not None else torch.ones_like(r, dtype=dtype)
            # y = γ (r x̂ + d) + β = BN with scale γ·r and shift β + γ·d; r, d are constants
            weight = gamma * r.to(dtype)
            bias = (bias if bias is not None else 0) + gamma * d.to(dtype)
        return weight, bias

    def _ghost(self, input: Tensor, size: int) -> Tensor:
        """Each ghost batch of ``size`` examples with its own statistics, r and d; then one
        update of the moving averages with the whole batch's moments (merged in float64)."""
        outputs, merged = [], None
        for chunk in input.split(size):
            m = chunk.numel() // chunk.shape[1]
            if m <= 1:
                raise ValueError(
                    f"{self._where()}: the last ghost batch of input {tuple(input.shape)} holds "
                    f"{chunk.shape[0]} example(s), one value per channel; use a batch size that "
                    f"leaves more than one example after dividing by {size}"
                )
            weight, bias = self._corrected(chunk)  # r, d against the step's running statistics
            y, mean, var = _train(
                chunk, weight, bias, None, None, None, None, self.eps, False, None, ""
            )
            outputs.append(y)
            part = Moments.from_batch(mean, var, m)
            merged = part if merged is None else merge_moments(merged, part)
        self._update_running_stats(merged.mean, merged.var, int(merged.count))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()  # type: ignore[misc]
            + f", r_max={self.r_max}, d_max={self.d_max}, warmup={self.warmup}"
            + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "")
        )


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    """Batch Renorm over ``(N, C)`` or ``(N, C, L)`` inputs; see :class:`_RenormMixin`."""


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    """Batch Renorm over ``(N, C, H, W)`` inputs; see :class:`_RenormMixin`."""


class BatchRenorm3d(_RenormMixin, BatchNorm3d):
    """Batch Renorm over ``(N, C, D, H, W)`` inputs; see :class:`_RenormMixin`."""
