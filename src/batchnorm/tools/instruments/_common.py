"""What every instrument shares: a snapshot of all the state a measurement can touch, restored
exactly; one way to choose layers; one way to run the user's loss.

A measurement runs extra forward and backward passes, moves parameters, steps the optimizer and
draws random numbers (Dropout, noisy BN). For the training run to be *bitwise* the same with and
without the instrument, :class:`Snapshot` records, and restores in place (the very same tensor
objects, so an optimizer and any outside references keep working):

- parameter values, ``requires_grad`` and ``.grad`` (the same gradient tensor object, or None);
- every buffer (running statistics, ``num_batches_tracked``, non-persistent ones too), and the
  state our BN layers keep outside buffers (population / deferred accumulators, the non-finite
  skip counter whether it is a buffer or an attribute), and the statistics accumulators that
  forward hooks hold (:func:`~batchnorm.tools.accumulate_statistics` on torch's BN layers);
- every module's train/eval mode;
- the random streams: torch's CPU generator, CUDA's if initialized, Python's and NumPy's global
  ones, and every ``torch.Generator`` held by a module (e.g. :class:`~batchnorm.nn.NoisyBatchNorm1d`);
- the optimizer's per-parameter state (momentum buffers, Adam moments, step counts), its param
  groups' hyperparameters and its scalar attributes (e.g. the flag an LR scheduler sets).

Restoring the random streams before every pass also gives each pass of one measurement the same
Dropout masks and noise: "the same batch" includes the same randomness.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...functional.stats import PopulationStats

LossFn = Callable[[nn.Module, Any], Tensor]

# State our BN layers keep outside parameters and buffers (see batchnorm.nn.modules).
_ACCUMULATORS = ("_population", "_deferred")
_COUNTERS = ("nonfinite_skips",)


class _RandomState:
    """Every random stream a forward pass may draw from."""

    def __init__(self, model: nn.Module) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        self.python = random.getstate()
        self.numpy = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what user code draws from)
        seen: dict[int, tuple[torch.Generator, Tensor]] = {}
        for m in model.modules():
            for v in vars(m).values():
                if isinstance(v, torch.Generator) and id(v) not in seen:
                    seen[id(v)] = (v, v.get_state())
        self.generators = list(seen.values())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)  # noqa: NPY002
        for g, state in self.generators:
            g.set_state(state)


class Snapshot:
    """Everything a measurement on ``model`` (and ``optimizer``) may change; see the module
    docstring. ``restore()`` puts it all back; its keywords restore parts between passes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        if optimizer is not None:
            known = {id(p) for p in self.params}
            self.params += [
                p for g in optimizer.param_groups for p in g["params"] if id(p) not in known
            ]
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]
            self.grads = [
                (p.grad, None if p.grad is None else p.grad.detach().clone()) for p in self.params
            ]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.modes = [(m, m.training) for m in model.modules()]
        self.buffers = [
            (m, name, b, b.detach().clone())
            for m in model.modules()
            for name, b in m._buffers.items()
            if b is not None
        ]
        self.accumulators = [
            (m, attr, obj, None if obj is None else copy.deepcopy(vars(obj)))
            for m in model.modules()
            for attr in _ACCUMULATORS
            if hasattr(m, attr)
            for obj in [getattr(m, attr)]
        ]
        # Accumulators held by forward hooks (accumulate_statistics on torch's BN layers keeps its
        # per-layer PopulationStats in a hook's closure): a measurement's passes must not count.
        self.hooked = [
            (obj, copy.deepcopy(vars(obj)))
            for obj in {id(o): o for o in _hook_accumulators(model)}.values()
        ]
        self.counters = [
            (m, attr, copy.deepcopy(getattr(m, attr)))
            for m in model.modules()
            for attr in _COUNTERS
            if hasattr(m, attr) and attr not in m._buffers
        ]
        self.random = _RandomState(model)
        self.optim = _OptimizerState(optimizer) if optimizer is not None else None

    def restore(
        self,
        *,
        params: bool = True,
        grads: bool = True,
        state: bool = True,
        optimizer: bool = True,
    ) -> None:
        """Restore parameters, gradients, module state (buffers, accumulators, counters, modes,
        ``requires_grad``, random streams) and the optimizer — or the parts asked for."""
        with torch.no_grad():
            if params:
                for p, v in zip(self.params, self.values, strict=True):
                    p.copy_(v)
            if grads:
                for p, (obj, value) in zip(self.params, self.grads, strict=True):
                    p.grad = obj
                    if obj is not None:
                        obj.copy_(value)
            if state:
                for m, name, b, value in self.buffers:
                    m._buffers[name] = b
                    b.copy_(value)
        if state:
            for m, attr, obj, saved in self.accumulators:
                if obj is not None:
                    vars(obj).clear()
                    vars(obj).update(copy.deepcopy(saved))
                setattr(m, attr, obj)
            for obj, saved in self.hooked:
                vars(obj).clear()
                vars(obj).update(copy.deepcopy(saved))
            for m, attr, saved in self.counters:
                current = getattr(m, attr)
                if isinstance(current, Tensor) and isinstance(saved, Tensor):
                    with torch.no_grad():
                        current.copy_(saved)
                else:
                    setattr(m, attr, copy.deepcopy(saved))
            for m, mode in self.modes:
                m.training = mode
            for p, flag in zip(self.params, self.requires_grad, strict=True):
                p.requires_grad_(flag)
            self.random.restore()
        if optimizer and self.optim is not None:
            self.optim.restore()


def _hook_accumulators(model: nn.Module) -> Iterator[PopulationStats]:
    for m in model.modules():
        for fn in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
            for cell in getattr(fn, "__closure__", None) or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(value, PopulationStats):
                    yield value


class _OptimizerState:
    """An optimizer's per-parameter state, group hyperparameters and scalar attributes."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state = {p: _clone_state(s) for p, s in optimizer.state.items()}
        self.groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups
        ]
        self.scalars = {
            k: v for k, v in vars(optimizer).items() if isinstance(v, (bool, int, float, str))
        }

    def restore(self) -> None:
        opt = self.optimizer
        for p in [p for p in opt.state if p not in self.state]:
            del opt.state[p]
        for p, saved in self.state.items():
            current = opt.state[p]
            for k in [k for k in current if k not in saved]:
                del current[k]
            for k, v in saved.items():
                old = current.get(k)
                if isinstance(v, Tensor) and isinstance(old, Tensor) and _same_kind(old, v):
                    with torch.no_grad():
                        old.copy_(v)
                else:
                    current[k] = v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
        for g, saved in zip(opt.param_groups, self.groups, strict=True):
            g.update(copy.deepcopy(saved))
        for k in [k for k, v in vars(opt).items() if isinstance(v, (bool, int, float, str))]:
            if k not in self.scalars:
                delattr(opt, k)
        for k, v in self.scalars.items():
            setattr(opt, k, v)


def _clone_state(state: dict) -> dict:
    return {
        k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
        for k, v in state.items()
    }


def _same_kind(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


@contextlib.contextmanager
def preserved(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[Snapshot]:
    """Snapshot ``model`` (and ``optimizer``) and restore all of it on exit, also on exceptions."""
    snap = Snapshot(model, optimizer)
    try:
        yield snap
    finally:
        snap.restore()


@contextlib.contextmanager
def quiet_step_hooks(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Without the optimizer's own step pre/post hooks (e.g. an EMA of the weights updated after
    every step): an instrument's trial steps are not training steps."""
    saved = [
        (attr, getattr(optimizer, attr))
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
        if hasattr(optimizer, attr)
    ]
    for attr, hooks in saved:
        setattr(optimizer, attr, type(hooks)())
    try:
        yield
    finally:
        for attr, hooks in saved:
            setattr(optimizer, attr, hooks)


def run_loss(loss_fn: LossFn, model: nn.Module, batch: Any, tool: str) -> Tensor:
    """``loss_fn(model, batch)`` with autograd on, checked to be a finite-or-not scalar tensor
    that depends on the parameters."""
    with torch.enable_grad():
        loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        kind = (
            f"a tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, Tensor)
            else f"a {type(loss).__name__}"
        )
        raise TypeError(
            f"{tool}: loss_fn(model, batch) must return a scalar tensor (the training loss), got "
            f"{kind}"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{tool}: the loss does not depend on any parameter that requires grad (was it "
            "computed under torch.no_grad(), or on detached outputs?)"
        )
    return loss.reshape(())


# -- choosing layers ---------------------------------------------------------------------------

LayerSpec = Sequence[str | nn.Module] | type | tuple[type, ...] | None

WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def select_layers(
    model: nn.Module, layers: LayerSpec, default: Callable[[nn.Module], bool], tool: str
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for the layers asked for, in the model's module order.

    ``layers`` is ``None`` (``default`` chooses), a module type or tuple of types (every module of
    that type), or a sequence of qualified names and/or modules of ``model``.
    """
    named = [(name or type(m).__name__, m) for name, m in model.named_modules()]
    if layers is None:
        chosen = [(n, m) for n, m in named if default(m)]
    elif isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        chosen = [(n, m) for n, m in named if isinstance(m, layers)]
    else:
        by_name = dict(named)
        by_id = {id(m): n for n, m in reversed(named)}
        chosen = []
        for spec in layers:
            if isinstance(spec, str):
                if spec not in by_name:
                    raise KeyError(
                        f"{tool}: the model has no module named {spec!r}; modules: "
                        f"{[n for n, _ in named][:30]}"
                    )
                chosen.append((spec, by_name[spec]))
            elif isinstance(spec, nn.Module):
                if id(spec) not in by_id:
                    raise ValueError(
                        f"{tool}: the {type(spec).__name__} passed in layers is not a module of "
                        "the model"
                    )
                chosen.append((by_id[id(spec)], spec))
            else:
                raise TypeError(
                    f"{tool}: layers must hold module names or modules, got a {type(spec).__name__}"
                )
    if not chosen:
        raise ValueError(f"{tool}: no layers to measure (layers={layers!r})")
    return chosen


def layer_weight(name: str, module: nn.Module, tool: str) -> nn.Parameter:
    """The layer's ``weight`` parameter, or a clear error."""
    w = module._parameters.get("weight")
    if not isinstance(w, nn.Parameter):
        raise ValueError(
            f"{tool}: layer '{name}' ({type(module).__name__}) has no 'weight' parameter to measure"
        )
    return w


def flat64(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """The concatenation of ``tensors`` as one float64 vector (a None counts as zeros of ``like``)."""
    return torch.cat(
        [
            (torch.zeros_like(ref) if t is None else t).detach().reshape(-1).double().cpu()
            for t, ref in zip(tensors, like, strict=True)
        ]
    )
