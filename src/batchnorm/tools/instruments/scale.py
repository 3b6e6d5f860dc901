"""Scale invariance of back-propagation through BN (Sec. 3.3 of arXiv:1502.03167), measured.

"Batch Normalization also makes training more resilient to the parameter scale": for a scalar a,

    BN(W u) = BN((aW) u),   ∂BN((aW)u)/∂u = ∂BN(Wu)/∂u,   ∂BN((aW)u)/∂(aW) = (1/a) · ∂BN(Wu)/∂W,

so the scale of a layer's weights does not affect the layer Jacobian nor, therefore, the gradient
propagated below it, and larger weights get smaller gradients — which, the paper argues,
stabilizes their growth and lets the learning rate be raised (Sec. 3.3, 4.2.1). The identities
hold exactly for a > 0 when the layer's output goes straight into BN (its bias, if any, is
cancelled by the mean subtraction; ε breaks exactness by a relative O(ε/σ²)); for a < 0 BN's
output changes sign, so only a > 0 is accepted.

:func:`scale_check` replaces one layer's weight W by aW in the whole model (everything else
fixed), recomputes the loss on the batch, and reports, against a = 1:

- ``loss_change`` = |L(aW) − L(W)| / |L(W)|                         (0 when invariant)
- ``weight_grad_ratio`` = ‖∂L/∂(aW)‖ / ‖∂L/∂W‖                      (1/a when invariant)
- ``weight_grad_error`` = ‖a · ∂L/∂(aW) − ∂L/∂W‖ / ‖∂L/∂W‖          (0: the whole tensor ∝ 1/a)
- ``input_grad_ratio`` = ‖∂L/∂u at aW‖ / ‖∂L/∂u at W‖                 (1 when invariant)
- ``input_grad_error`` = ‖∂L/∂u at aW − ∂L/∂u at W‖ / ‖∂L/∂u at W‖   (0: the Jacobian-vector
  product, i.e. the gradient sent to the layers below, is unchanged)

where u is the layer's input. A network without BN after the layer shows how far from invariant
it is (for a linear layer followed by ReLU and nothing else, the loss itself changes).

Every pass sees the same batch, randomness and BN running statistics; the model's mode is kept.
Cost per call, for K layers and F factors: 1 + K·F forward and backward passes, each backward
only as far as the layer's input (``torch.autograd.grad`` on the layer's weight and input); the
layer's input is captured by a forward pre-hook that passes it on as a detached leaf, so the
backward stops there. Extra memory: a copy of the parameters and buffers, and per layer its
input and weight gradients at a = 1. The weight is put back from the copy (bit for bit), also
on exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import WEIGHTED, LayerSpec, LossFn, Snapshot, layer_weight, run_loss, select_layers

__all__ = ["ScaleCheck", "ScaleReport", "scale_check"]


@dataclass(frozen=True)
class ScaleCheck:
    """One layer's weight scaled by ``factor``; the ratios described in the module docstring."""

    name: str
    factor: float
    loss_change: float
    weight_grad_ratio: float
    weight_grad_error: float
    input_grad_ratio: float
    input_grad_error: float

    def invariant(self, rtol: float = 1e-4) -> bool:
        """Whether the layer behaved as Sec. 3.3 says, to relative tolerance ``rtol``."""
        return (
            self.loss_change <= rtol
            and self.weight_grad_error <= rtol
            and self.input_grad_error <= rtol
        )


@dataclass(frozen=True)
class ScaleReport:
    """Results of :func:`scale_check`; ``report["1", 10.0]`` looks up a (layer, factor) pair."""

    loss: float  # L(W), every layer at its own scale
    checks: tuple[ScaleCheck, ...]

    def __getitem__(self, key: tuple[str, float]) -> ScaleCheck:
        name, factor = key
        for c in self.checks:
            if c.name == name and c.factor == float(factor):
                return c
        raise KeyError(
            f"no check for layer {name!r} at factor {factor!r}; checked: "
            f"{[(c.name, c.factor) for c in self.checks]}"
        )

    def __str__(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [
            f"scale check W → aW (Sec. 3.3), loss {self.loss:.5g}",
            f"  {'layer':<{width}}  {'a':>6}  {'Δloss':>9}  {'‖∂W‖ ratio':>10}  {'× a':>8}  "
            f"{'a·∂W err':>9}  {'‖∂u‖ ratio':>10}  {'∂u err':>9}  invariant",
        ]
        lines += [
            f"  {c.name:<{width}}  {c.factor:>6.3g}  {c.loss_change:>9.2e}  "
            f"{c.weight_grad_ratio:>10.4g}  {c.weight_grad_ratio * c.factor:>8.5f}  "
            f"{c.weight_grad_error:>9.2e}  {c.input_grad_ratio:>10.5f}  "
            f"{c.input_grad_error:>9.2e}  {'yes' if c.invariant() else 'no'}"
            for c in self.checks
        ]
        return "\n".join(lines)


def scale_check(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    layers: LayerSpec = None,
    *,
    factors: Sequence[float] = (0.1, 10.0),
) -> ScaleReport:
    """Scale each chosen layer's weight by each factor a, one at a time, and measure the loss, the
    weight gradient and the gradient reaching the layer's input; see the module docstring.

    Args:
        model: the model, in the mode it trains in.
        loss_fn: ``loss_fn(model, batch)`` returns the training loss (a scalar tensor).
        batch: the batch.
        layers: module names or modules, a module type (or tuple of types), or ``None`` for every
            ``nn.Linear`` and convolution. Each must be called exactly once per forward.
        factors: the scales a > 0 (default 0.1 and 10, the issue's study grid).
    """
    tool = "scale_check"
    factors = tuple(float(a) for a in factors)
    if not factors or not all(a > 0 and math.isfinite(a) for a in factors):
        raise ValueError(
            f"{tool}: factors must be positive numbers (BN(aWu) = BN(Wu) needs a > 0), got "
            f"{factors!r}"
        )
    chosen = select_layers(model, layers, lambda m: isinstance(m, WEIGHTED), tool)
    weights = [layer_weight(name, m, tool) for name, m in chosen]
    snap = Snapshot(model)
    checks = []
    try:
        base_loss = None
        for (name, module), w in zip(chosen, weights, strict=True):
            original = _values(snap, w)
            loss, gw, gu = _pass(loss_fn, model, batch, snap, name, module, w, tool)
            base_loss = loss if base_loss is None else base_loss
            for a in factors:
                with torch.no_grad():
                    w.copy_(original * a)
                loss_a, gw_a, gu_a = _pass(loss_fn, model, batch, snap, name, module, w, tool)
                with torch.no_grad():
                    w.copy_(original)
                checks.append(_check(name, a, loss, loss_a, gw, gw_a, gu, gu_a))
    finally:
        snap.restore()
    return ScaleReport(base_loss, tuple(checks))


def _values(snap: Snapshot, w: nn.Parameter) -> Tensor:
    for p, v in zip(snap.params, snap.values, strict=True):
        if p is w:
            return v
    raise AssertionError("the weight is a parameter of the model")


def _pass(
    loss_fn: LossFn,
    model: nn.Module,
    batch: Any,
    snap: Snapshot,
    name: str,
    module: nn.Module,
    w: nn.Parameter,
    tool: str,
) -> tuple[float, Tensor, Tensor]:
    """One forward/backward from step-t state; the loss, ∂L/∂W and ∂L/∂u (float64)."""
    snap.restore(params=False, grads=False)  # buffers, modes, random streams
    w.requires_grad_(True)
    inputs: list[Tensor] = []

    def capture(mod: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{tool}: layer '{name}' was not called with a tensor input")
        u = args[0].detach().requires_grad_(True)  # the backward stops here
        inputs.append(u)
        return (u, *args[1:])

    handle = module.register_forward_pre_hook(capture)
    try:
        loss = run_loss(loss_fn, model, batch, tool)
    finally:
        handle.remove()
    if len(inputs) != 1:
        raise ValueError(
            f"{tool}: layer '{name}' was called {len(inputs)} times in one forward pass; the "
            "check needs a layer called exactly once"
        )
    gw, gu = torch.autograd.grad(loss, [w, inputs[0]], allow_unused=True)
    gw = torch.zeros_like(w) if gw is None else gw
    gu = torch.zeros_like(inputs[0]) if gu is None else gu
    return float(loss.detach()), gw.detach().double(), gu.detach().double()


def _rel(x: Tensor, ref: Tensor) -> float:
    n = float(ref.norm())
    d = float(x.norm())
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


def _check(
    name: str,
    a: float,
    loss: float,
    loss_a: float,
    gw: Tensor,
    gw_a: Tensor,
    gu: Tensor,
    gu_a: Tensor,
) -> ScaleCheck:
    nw, nu = float(gw.norm()), float(gu.norm())
    return ScaleCheck(
        name,
        a,
        abs(loss_a - loss) / abs(loss) if loss != 0 else abs(loss_a - loss),
        float(gw_a.norm()) / nw if nw > 0 else math.nan,
        _rel(a * gw_a - gw, gw),
        float(gu_a.norm()) / nu if nu > 0 else math.nan,
        _rel(gu_a - gu, gu),
    )
