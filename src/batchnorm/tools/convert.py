"""Swap every BN layer of a model between ``torch.nn.BatchNorm*`` and ``batchnorm.nn.BatchNorm*``.

The two families have the same parameters and buffers, so a swap moves weights and statistics and
the converted model computes the same function. The module surgery it uses (copy, replace, swap a
layer's class) is :mod:`batchnorm.nn.surgery`, shared with :func:`~batchnorm.nn.sync.convert_sync`.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.surgery import check_initialized, copy_model, name_layers, replace_modules, swap_class

__all__ = [
    "bn_layers",
    "check_initialized",
    "convert",
    "copy_model",
    "name_layers",
    "replace_modules",
    "swap_class",
]

_TORCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BN layer of ``model`` (ours, torch's, SyncBatchNorm) with its qualified name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


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
    root = copy_model(model, "convert", inplace)

    def swap(m: nn.Module) -> nn.Module | None:
        cls = _target_class(m, to)
        return swap_class(m, cls) if cls is not None else None

    root = replace_modules(root, swap)
    return name_layers(root) if to == "batchnorm" else root
