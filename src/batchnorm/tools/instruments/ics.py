"""Internal covariate shift as Santurkar et al. define it: how much a layer's gradient changes when
the layers below it take their update.

arXiv:1502.03167 (Sec. 1–2) names *internal covariate shift* the change of a layer's input
distribution caused by the updates of the layers before it, and explains BN's speed-up by reducing
it. Santurkar, Tsipras, Ilyas & Mądry 2018 (arXiv:1805.11604, Sec. 2.2, Definition 2.1) make the
notion operational from the point of view of optimization: at step t, with the loss L of the
step's batch (x_t, y_t) and the weights W_1 … W_n of the n layers,

    G_k  = ∇_{W_k} L(W_1^t, …, W_{k−1}^t,     W_k^t, …, W_n^t; x_t, y_t)
    G'_k = ∇_{W_k} L(W_1^{t+1}, …, W_{k−1}^{t+1}, W_k^t, …, W_n^t; x_t, y_t)

and ICS of layer k is the difference ‖G_k − G'_k‖₂ (they also plot cos(G_k, G'_k)): how much the
update of the layers below changes the problem layer k is solving. They found it is not reduced by
BN, often increased (their Figure 3).

How this implementation defines the pieces, for any model and any torch optimizer:

- *Layers* are the modules asked for (default: every ``nn.Linear`` and convolution); G_k is the
  gradient of the layer's ``weight``.
- *Below* layer k are the parameters of every module whose first call in the forward pass comes
  before layer k's first call (found with forward pre-hooks on the G pass): the weights, biases
  and BN γ/β under it that require grad (frozen ones do not move in training). Layer k's own other parameters (its bias) and everything after it stay at
  step t. A module's own parameters are placed where the module is *called*: a custom module that
  uses its own parameters after its children is ordered before them (wrap such parameters in a
  submodule for exact ordering).
- *The update* W^{t+1} is what ``optimizer.step()`` does to those parameters with this batch's
  gradient and the optimizer's state as it is: momentum buffer (updated with this gradient),
  weight decay, Adam's moments and step count, the learning rate of the parameter's group. So
  W^{t+1}_{<k} are exactly the weights the training run has after this step if it takes the step
  on the same batch with the gradient of this loss alone (no accumulation, clipping or scaling
  between ``backward`` and ``step``). The trial step is taken by the very optimizer, with the
  gradients of every other parameter set to ``None`` (torch's optimizers then skip them, also for
  momentum and decay); its step hooks are not run (they may be EMA updates and the like), and its
  state and the parameters are restored before the next layer and on exit.
- *The same batch* includes the same randomness: Dropout masks and noisy BN draws are those of the
  G pass (the random streams are reset before every pass), and BN running statistics are reset
  too, so only the lower weights differ between G_k and G'_k.

The first layer has nothing below it: G'_1 = G_1, reported as 0 and cosine 1 without a pass.

Cost per call, for K measured layers with something below them: 1 + K forward passes, one full
backward and K backwards truncated at layer k (``torch.autograd.grad`` on its weight only), K
optimizer steps (over the lower parameters only) and 2K in-place restores; extra memory: one copy
of the parameters, of their gradients (twice: the caller's and G), of the buffers and of the
optimizer state. The model, the optimizer and every random stream are as they were afterwards,
also if the loss raises (:class:`~batchnorm.tools.instruments._common.Snapshot`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._common import (
    WEIGHTED,
    LayerSpec,
    LossFn,
    Snapshot,
    layer_weight,
    quiet_step_hooks,
    run_loss,
    select_layers,
)

__all__ = ["ICSReport", "LayerICS", "internal_covariate_shift"]


@dataclass(frozen=True)
class LayerICS:
    """Santurkar et al.'s ICS of one layer at one step.

    Attributes:
        name: the layer's qualified name.
        lower_params: parameter tensors below the layer that took the trial update.
        grad_norm: ‖G_k‖, the layer's weight gradient before the update of the layers below.
        diff_norm: ‖G_k − G'_k‖ (Santurkar et al.'s ICS).
        relative: ‖G_k − G'_k‖ / ‖G_k‖ (comparable across layers and networks; NaN if G_k = 0).
        cosine: cos(G_k, G'_k) (1: the direction is unchanged; NaN if either is 0).
    """

    name: str
    lower_params: int
    grad_norm: float
    diff_norm: float
    relative: float
    cosine: float


@dataclass(frozen=True)
class ICSReport:
    """Per-layer results of :func:`internal_covariate_shift`; ``report["1"]`` looks one up."""

    loss: float  # the batch's loss at step t
    layers: tuple[LayerICS, ...]

    def __getitem__(self, name: str) -> LayerICS:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no measured layer named {name!r}; layers: {[x.name for x in self.layers]}")

    def __str__(self) -> str:
        width = max([len(x.name) for x in self.layers] + [5])
        lines = [
            f"internal covariate shift (Santurkar et al. Def. 2.1), loss {self.loss:.4g}",
            f"  {'layer':<{width}}  {'below':>5}  {'‖G‖':>10}  {'‖G−G′‖':>10}  {'relative':>9}  "
            f"{'cos':>8}",
        ]
        lines += [
            f"  {x.name:<{width}}  {x.lower_params:>5}  {x.grad_norm:>10.4g}  {x.diff_norm:>10.4g}"
            f"  {x.relative:>9.4g}  {x.cosine:>8.5f}"
            for x in self.layers
        ]
        return "\n".join(lines)


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    layers: LayerSpec = None,
) -> ICSReport:
    """Measure Santurkar et al.'s ICS (‖G_k − G'_k‖ and cos(G_k, G'_k)) of every chosen layer at
    the current step, on ``batch``; see the module docstring for the definitions and the cost.

    Args:
        model: the model, in the mode it trains in.
        loss_fn: ``loss_fn(model, batch)`` returns the training loss (a scalar tensor), e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]), b[1])``.
        batch: this step's batch (anything ``loss_fn`` takes).
        optimizer: the optimizer that trains ``model``; its update defines W^{t+1}.
        layers: module names or modules, a module type (or tuple of types), or ``None`` for every
            ``nn.Linear`` and convolution.

    Call it between training steps (before the step on ``batch``, or instead of nothing): it
    leaves ``model``, ``optimizer`` and the random streams exactly as it found them.
    """
    tool = "internal_covariate_shift"
    chosen = select_layers(model, layers, lambda m: isinstance(m, WEIGHTED), tool)
    weights = [layer_weight(name, m, tool) for name, m in chosen]
    snap = Snapshot(model, optimizer)

    def fresh_pass() -> None:  # the state of step t: buffers, modes, random streams
        snap.restore(params=False, grads=False, optimizer=False)
        for w in weights:
            w.requires_grad_(True)

    try:
        fresh_pass()
        order = _CallOrder(model)
        for p in snap.params:
            p.grad = None
        with order:
            loss = run_loss(loss_fn, model, batch, tool)
        loss.backward()
        loss_value = float(loss.detach())
        del loss
        grads = {id(p): p.grad.detach().clone() for p in snap.params if p.grad is not None}
        # Parameters frozen by the caller do not move in training, so not in the trial step either
        # (a measured layer's frozen weight got requires_grad only for its own gradient).
        trainable = {id(p) for p, rg in zip(snap.params, snap.requires_grad, strict=True) if rg}
        results = []
        for (name, module), w in zip(chosen, weights, strict=True):
            g_k = grads.get(id(w))
            if g_k is None:
                raise ValueError(f"{tool}: layer '{name}' got no gradient from the loss")
            lower = [
                p
                for p in order.below(module, name, tool)
                if id(p) in grads and id(p) in trainable and p is not w
            ]
            if not lower:  # nothing below moves: G'_k = G_k
                norm = float(g_k.double().norm())
                results.append(LayerICS(name, 0, norm, 0.0, 0.0 if norm else math.nan, 1.0))
                continue
            moving = {id(p) for p in lower}
            for p in snap.params:
                p.grad = grads[id(p)].clone() if id(p) in moving else None
            with quiet_step_hooks(optimizer):
                optimizer.step()  # W_{<k}: t -> t+1
            for p in snap.params:
                p.grad = None
            fresh_pass()
            loss_after = run_loss(loss_fn, model, batch, tool)
            (g_after,) = torch.autograd.grad(loss_after, [w], allow_unused=True)
            del loss_after
            if g_after is None:
                g_after = torch.zeros_like(w)
            results.append(_compare(name, len(lower), g_k, g_after))
            snap.restore(grads=False)  # parameters and optimizer state back to step t
            fresh_pass()
    finally:
        snap.restore()
    return ICSReport(loss_value, tuple(results))


def _compare(name: str, lower: int, g: torch.Tensor, g_after: torch.Tensor) -> LayerICS:
    a, b = g.detach().double().reshape(-1), g_after.detach().double().reshape(-1)
    na, nb, diff = float(a.norm()), float(b.norm()), float((a - b).norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return LayerICS(name, lower, na, diff, diff / na if na > 0 else math.nan, cos)


class _CallOrder:
    """Forward pre-hooks on every module that owns parameters, recording the order of first calls;
    used as a context manager around one forward pass (hooks removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        self.first: dict[int, int] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _CallOrder:
        for m in self.owners:
            self.handles.append(m.register_forward_pre_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.first.setdefault(id(module), len(self.first))

    def below(self, module: nn.Module, name: str, tool: str) -> Sequence[nn.Parameter]:
        if id(module) not in self.first:
            raise ValueError(f"{tool}: layer '{name}' was not called by the forward pass")
        rank = self.first[id(module)]
        out, seen = [], set()
        for m in self.owners:
            if self.first.get(id(m), rank) < rank:
                for p in m.parameters(recurse=False):
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out
