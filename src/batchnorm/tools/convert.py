"""Swap every BN layer of a model between ``torch.nn.BatchNorm*`` and ``batchnorm.nn.BatchNorm*``.

The two families have the same parameters and buffers, so a swap moves weights and statistics and
the converted model computes the same function. The module-replacement helper used by every tool
that swaps layers (:func:`replace_modules`) lives here too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

from torch import nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["bn_layers", "convert", "name_layers"]

_TORCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BN layer of ``model`` (ours, torch's, SyncBatchNorm) with its qualified name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def name_layers(model: nn.Module) -> nn.Module:
    """Give each layer of ``model`` that has a ``layer_name`` attribute (our BN layers, frozen BN
    layers) its qualified name in ``model``, used in error messages."""
    for name, m in model.named_modules():
        if hasattr(m, "layer_name"):
            m.layer_name = name or type(m).__name__
    return model


def check_initialized(model: nn.Module, tool: str) -> None:
    """Raise if ``model`` holds a lazy layer whose shapes are not known yet."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{tool}: lazy layer '{name or type(m).__name__}' is not initialized yet; run one "
                "forward pass first so that its shapes are known"
            )


def replace_modules(root: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every module ``m`` of ``root`` (``root`` included) for which ``fn(m)``
    returns a module. A module reachable under several names, or used in several places, is
    replaced everywhere by one new module. Returns the new root (``root`` unless it was replaced).
    Children of a replaced module are not visited."""
    new_root = fn(root)
    if new_root is not None:
        return new_root
    done: dict[int, nn.Module | None] = {}
    stack = [root]
    seen: set[int] = set()
    while stack:
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        # _modules, not named_children(): the latter skips a module's second appearance
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = fn(child)
            if done[id(child)] is not None:
                parent._modules[child_name] = done[id(child)]
            else:
                stack.append(child)
    return root


def swap_class(m: nn.modules.batchnorm._BatchNorm, cls: type[nn.Module]) -> nn.Module:
    """A layer of class ``cls`` holding the *same* parameter and buffer objects as ``m`` (so an
    optimizer built on ``m``'s parameters keeps training the new layer), in ``m``'s mode."""
    ref = m.weight if m.weight is not None else m.running_mean
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    new = cls(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        bias=m.bias is not None if m.affine else True,
        **factory,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = m._buffers.get(name)
    new.train(m.training)
    return new


def _target_class(m: nn.Module, to: str) -> type[nn.Module] | None:
    source, target = (_TORCH, _OURS) if to == "batchnorm" else (_OURS, _TORCH)
    for src, dst in zip(source, target, strict=True):
        if type(m) is src:  # exact type: ours subclass torch's
            return dst
    return None


def convert(
    model: nn.Module, to: Literal["batchnorm", "torch"] = "batchnorm", *, inplace: bool = False
) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` by ours (``to="batchnorm"``) or the
    reverse (``to="torch"``), keeping parameters, statistics, ``requires_grad`` and train/eval state.

    Returns the converted model: a copy unless ``inplace=True``. In place, the new layers hold the
    very same parameter tensors, so an optimizer built before the conversion keeps working. Other
    layers (and torch's ``SyncBatchNorm``) are left alone.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: 'to' must be 'batchnorm' or 'torch', got {to!r}")
    check_initialized(model, "convert")
    root = model if inplace else copy.deepcopy(model)

    def swap(m: nn.Module) -> nn.Module | None:
        cls = _target_class(m, to)
        return swap_class(m, cls) if cls is not None else None

    root = replace_modules(root, swap)
    return name_layers(root) if to == "batchnorm" else root
