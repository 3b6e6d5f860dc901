"""The loss landscape along the gradient step: how much the loss and its gradient change.

Santurkar, Tsipras, Ilyas & Mądry 2018 (arXiv:1805.11604, Sec. 3.1, Figure 4) credit BN's effect
on training to a smoother landscape rather than to reduced internal covariate shift
(arXiv:1502.03167, Sec. 1–2): at a training step they move the weights along the gradient and
measure (a) the variation of the loss, (b) "gradient predictiveness", the change of the gradient,
and (c) the "effective β-smoothness", the largest change of the gradient per distance moved —
the Lipschitz constant of the gradient along the step, which bounds how far a step of that size
can be trusted (their Sec. 3.1; β-smoothness in their Sec. 4).

Here, with θ every parameter that requires grad, L the loss of the batch and g = ∇L(θ), for step
sizes η = lr · c over the factors c (default 0.05 … 4, log-spaced, as Santurkar et al. span the
learning rate):

    θ_η = θ − η g,    distance_η = η ‖g‖,    Δ_η = ‖∇L(θ_η) − ∇L(θ)‖,

    loss variation      = max_η L(θ_η) − min_η L(θ_η)   (over the grid; L(θ) itself is reported)
    gradient variation  = max_η Δ_η
    effective β         = max_η Δ_η / distance_η

For a quadratic L(θ) = ½ θᵀAθ, Δ_η / distance_η = ‖Ag‖ / ‖g‖ for every η (the curvature along
g), so effective β is the largest eigenvalue of A when g lies along its eigenvector; the tests use
this as the exact oracle. The direction is the raw gradient, not the optimizer's step (with
momentum they differ); pass the learning rate you want the grid scaled by.

Every pass sees the same batch with the same randomness (Dropout masks, noisy BN draws) and the
same BN running statistics as the first, and runs in the model's own mode (train mode: BN uses the
batch's statistics, as the training step does).

Cost per call, for F factors: 1 + F forward and backward passes over all parameters; extra memory:
a copy of the parameters and gradients, two float64 vectors of the gradient's size (∇L(θ) and the
current one) and the buffers. Everything is restored on exit, also on exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._common import LossFn, Snapshot, flat64, run_loss

__all__ = ["DEFAULT_FACTORS", "SmoothnessReport", "smoothness"]

# lr × [0.05, 4], log-spaced (9 points, 1 among them): Santurkar et al.'s span of step sizes.
DEFAULT_FACTORS = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0)


@dataclass(frozen=True)
class SmoothnessReport:
    """The loss and its gradient along the gradient step, from :func:`smoothness`.

    Attributes:
        lr: the learning rate the factors scale.
        loss: L(θ), the batch's loss at the current weights.
        grad_norm: ‖∇L(θ)‖.
        step_sizes: η = lr · c per factor c.
        losses: L(θ − η g) per step size.
        grad_changes: ‖∇L(θ − η g) − ∇L(θ)‖ per step size.
        distances: η ‖g‖ per step size.
    """

    lr: float
    loss: float
    grad_norm: float
    step_sizes: tuple[float, ...]
    losses: tuple[float, ...]
    grad_changes: tuple[float, ...]
    distances: tuple[float, ...]

    @property
    def loss_variation(self) -> float:
        """max − min of the loss over the step sizes (Santurkar et al. Fig. 4a)."""
        return max(self.losses) - min(self.losses)

    @property
    def grad_variation(self) -> float:
        """The largest gradient change over the step sizes (Fig. 4b, "gradient predictiveness")."""
        return max(self.grad_changes)

    @property
    def beta(self) -> float:
        """Effective β-smoothness: max over step sizes of gradient change ÷ distance (Fig. 4c)."""
        ratios = [d / x for d, x in zip(self.grad_changes, self.distances, strict=True) if x > 0]
        return max(ratios) if ratios else math.nan

    def __str__(self) -> str:
        lines = [
            f"smoothness along the gradient step (Santurkar et al. Sec. 3.1), lr {self.lr:g}: "
            f"loss {self.loss:.5g}, ‖g‖ {self.grad_norm:.4g}",
            f"  {'η':>10}  {'loss':>11}  {'‖Δgrad‖':>10}  {'‖Δgrad‖/dist':>12}",
        ]
        for eta, loss, d, x in zip(
            self.step_sizes, self.losses, self.grad_changes, self.distances, strict=True
        ):
            lines.append(
                f"  {eta:>10.4g}  {loss:>11.5g}  {d:>10.4g}  {d / x if x > 0 else math.nan:>12.4g}"
            )
        lines.append(
            f"  loss variation {self.loss_variation:.4g}, gradient variation "
            f"{self.grad_variation:.4g}, effective β {self.beta:.4g}"
        )
        return "\n".join(lines)


def smoothness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    lr: float,
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
) -> SmoothnessReport:
    """Move every trainable parameter along −∇L by lr · c for each factor c and measure the loss
    and the gradient there; see the module docstring for the quantities and the cost.

    Args:
        model: the model, in the mode it trains in.
        loss_fn: ``loss_fn(model, batch)`` returns the training loss (a scalar tensor).
        batch: the batch whose loss defines the landscape.
        lr: the learning rate; the step sizes are ``lr * c``.
        factors: positive factors c (default lr × [0.05, 4], 9 log-spaced points).
    """
    tool = "smoothness"
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{tool}: lr must be a positive number, got {lr!r}")
    factors = tuple(float(c) for c in factors)
    if not factors or not all(c > 0 and math.isfinite(c) for c in factors):
        raise ValueError(f"{tool}: factors must be positive numbers, got {factors!r}")
    snap = Snapshot(model)
    params = [p for p in snap.params if p.requires_grad]
    if not params:
        raise ValueError(f"{tool}: the model has no parameter that requires grad")
    try:
        snap.restore(params=False, grads=False)
        loss0, g0 = _loss_and_grad(loss_fn, model, batch, params, tool)
        grad_norm = float(g0.norm())
        direction = _unflatten(g0, params)
        losses, changes, distances = [], [], []
        for c in factors:
            eta = lr * c
            with torch.no_grad():
                for p, v, d in zip(params, _values(snap, params), direction, strict=True):
                    p.copy_(v.double() - eta * d)  # θ_η = θ − η g, formed in float64
            snap.restore(params=False, grads=False)  # buffers, modes, random streams
            loss, g = _loss_and_grad(loss_fn, model, batch, params, tool)
            losses.append(loss)
            changes.append(float((g - g0).norm()))
            distances.append(eta * grad_norm)
    finally:
        snap.restore()
    return SmoothnessReport(
        float(lr),
        loss0,
        grad_norm,
        tuple(lr * c for c in factors),
        tuple(losses),
        tuple(changes),
        tuple(distances),
    )


def _loss_and_grad(
    loss_fn: LossFn, model: nn.Module, batch: Any, params: list, tool: str
) -> tuple[float, torch.Tensor]:
    loss = run_loss(loss_fn, model, batch, tool)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss.detach()), flat64(grads, params)


def _values(snap: Snapshot, params: list) -> list[torch.Tensor]:
    by_id = {id(p): v for p, v in zip(snap.params, snap.values, strict=True)}
    return [by_id[id(p)] for p in params]


def _unflatten(flat: torch.Tensor, like: list) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in like:
        n = p.numel()
        out.append(flat[offset : offset + n].view_as(p).to(p.device))
        offset += n
    return out
