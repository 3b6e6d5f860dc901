"""Noisy BN: BN whose output is shifted and rescaled at random, per unit, at every training step.

Santurkar, Tsipras, Ilyas & Mądry 2018, *How Does Batch Normalization Help Optimization?*
(arXiv:1805.11604), Sec. 2.1: to test whether BN helps *because* it keeps each layer's input
distribution stable (the internal covariate shift of arXiv:1502.03167, Sec. 1–2), they inject
noise after every BN layer that gives each activation a non-zero mean and a non-unit variance which
change at every step ("time-varying"), so that the layers above see inputs that shift *more* than
without BN — and find the network trains about as fast as with plain BN (their Figure 2).

This layer is BN followed by that perturbation. At every training forward, for each unit
(channel) ``c``, it draws a scale and a shift

    s_c ~ U(1, noise_scale),   t_c ~ U(−noise_shift, noise_shift),   y = s · BN_{γ,β}(x) + t,

the same for every example and position of the batch, so each step moves the whole batch's
distribution of unit ``c`` (its mean by t_c, its standard deviation by the factor s_c): the
time-varying, non-zero-mean, non-unit-variance shift the experiment needs, independent of the data
and of the weights. ``noise_scale`` and ``noise_shift`` are the strength; (1, 0) is plain BN.

Choices, stated because they are ours:

- The noise acts on the layer's *output*, after γ and β ("noise injected after BatchNorm layers"),
  so the network cannot learn it away through γ, β; s and t are constants for autograd.
- The distributions (uniform, per unit, one draw per step) are this library's reading of the
  paper's description; Santurkar et al.'s exact sampling is in their Appendix A and not
  reproduced here number for number.
- Inference (``eval()``) is plain BN, bit for bit: no noise, the running statistics. The running
  statistics are updated from the *clean* batch statistics (the noise comes after them).
- Parameters and buffers are BN's and the noise keeps no state in the ``state_dict``, so
  checkpoints load into ``torch.nn.BatchNorm*`` (and our BN) and back with ``strict=True``. The
  random stream is the layer's ``generator`` (seeded by ``seed``), or torch's global CPU generator
  when ``seed is None``; it is not checkpointed: save ``layer.generator.get_state()`` yourself to
  resume a run with the very same noise. Draws are made on the CPU in float64 and moved to the
  input's device and dtype (C values per step: negligible, and the same numbers on every device).
- A layer of strength (1, 0) draws nothing, so it leaves every random stream alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d", "NoisyBatchNorm3d"]


class _NoisyMixin:
    """The noise on top of our BN layers; documented once, here (see the module docstring).

    Args (beyond BN's, keyword-only):
        noise_scale: upper bound of the per-unit scale s ~ U(1, noise_scale), ≥ 1. Default 2.
        noise_shift: half-width of the per-unit shift t ~ U(−noise_shift, noise_shift), ≥ 0.
            Default 1 (in units of the BN output, whose standard deviation is |γ|).
        seed: seeds the layer's own ``torch.Generator``; ``None`` (default) draws from torch's
            global CPU generator (then ``torch.manual_seed`` governs the noise).

    Attributes:
        generator: the layer's ``torch.Generator`` (CPU) or ``None``.
    """

    def __init__(
        self,
        *args,
        noise_scale: float = 2.0,
        noise_shift: float = 1.0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.noise_scale, self.noise_shift = float(noise_scale), float(noise_shift)
        self._check_noise()
        self.generator: torch.Generator | None = (
            None if seed is None else torch.Generator().manual_seed(seed)
        )

    def _check_noise(self) -> None:
        if not self.noise_scale >= 1 or not self.noise_shift >= 0:
            raise ValueError(
                f"{self._where()}: noisy BN needs noise_scale >= 1 and noise_shift >= 0, got "  # type: ignore[attr-defined]
                f"noise_scale={self.noise_scale}, noise_shift={self.noise_shift}"
            )

    def sample_noise(self) -> tuple[Tensor, Tensor]:
        """One draw of ``(s, t)``, each of shape ``(C,)``, float64 on the CPU; advances the stream."""
        c = self.num_features  # type: ignore[attr-defined]
        u = torch.rand(2, c, generator=self.generator, dtype=torch.float64)
        scale = 1 + (self.noise_scale - 1) * u[0]  # U(1, noise_scale)
        shift = self.noise_shift * (2 * u[1] - 1)  # U(−noise_shift, noise_shift)
        return scale, shift

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        y = super().forward(input, mask)  # type: ignore[misc]
        if (
            not self.training  # type: ignore[attr-defined]
            or isinstance(input, torch.fx.Proxy)
            or (self.noise_scale == 1 and self.noise_shift == 0)
        ):
            return y
        self._check_noise()
        scale, shift = self.sample_noise()
        shape = (1, -1) + (1,) * (y.dim() - 2)  # per channel, broadcast over N and positions
        scale = scale.to(device=y.device, dtype=y.dtype).view(shape)
        shift = shift.to(device=y.device, dtype=y.dtype).view(shape)
        return torch.addcmul(shift, y, scale)  # y = s · BN(x) + t

    def extra_repr(self) -> str:
        extra = super().extra_repr()  # type: ignore[misc]
        seeded = ", seeded" if self.generator is not None else ""
        return extra + f", noise_scale={self.noise_scale}, noise_shift={self.noise_shift}{seeded}"


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    """Noisy BN over ``(N, C)`` or ``(N, C, L)`` inputs; see :class:`_NoisyMixin`."""


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    """Noisy BN over ``(N, C, H, W)`` inputs; see :class:`_NoisyMixin`."""


class NoisyBatchNorm3d(_NoisyMixin, BatchNorm3d):
    """Noisy BN over ``(N, C, D, H, W)`` inputs; see :class:`_NoisyMixin`."""
