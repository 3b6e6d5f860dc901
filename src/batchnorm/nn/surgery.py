"""Module surgery shared by every converter: copy a model, replace modules in it, swap a BN layer's
class while keeping its very parameter and buffer tensors, and name our layers for error messages.

It lives at the ``nn`` floor because :meth:`SyncBatchNorm.convert_sync_batchnorm` (torch's API, on
the layer class) needs it; :mod:`batchnorm.tools` builds its converters on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .modules import _BatchNormMixin

__all__ = ["check_initialized", "copy_model", "name_layers", "replace_modules", "swap_class"]


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


def copy_model(model: nn.Module, tool: str, inplace: bool = False) -> nn.Module:
    """``model`` itself if ``inplace``, else a deep copy; either way checked by
    :func:`check_initialized`. Process groups (SyncBatchNorm's) cannot be copied: the copy shares
    them."""
    check_initialized(model, tool)
    if inplace:
        return model
    groups = {
        id(g): g for m in model.modules() if (g := getattr(m, "process_group", None)) is not None
    }
    return copy.deepcopy(model, memo=groups)


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
    optimizer built on ``m``'s parameters keeps training the new layer), in ``m``'s mode. Between
    two of our layers the extras come along too (``stats_mode`` and its accumulator,
    ``guard_nonfinite``, ``freeze_stats``, the ``nonfinite_skips`` counter)."""
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
    if isinstance(m, _BatchNormMixin) and isinstance(new, _BatchNormMixin):
        new.nonfinite_skips = m.nonfinite_skips  # the same counter object, like the buffers
        new.guard_nonfinite, new.freeze_stats = m.guard_nonfinite, m.freeze_stats
        if m.stats_mode == "population":
            new.stats_mode = "population"
            new._population = m.population
    new.train(m.training)
    return new
