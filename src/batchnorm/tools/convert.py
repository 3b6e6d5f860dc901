"""Swap every BN layer of a model between ``torch.nn.BatchNorm*`` and ``batchnorm.nn.BatchNorm*``.

The two families have the same parameters and buffers, so a swap moves weights and statistics with
a strict ``load_state_dict`` and the converted model computes the same function.
"""

from __future__ import annotations

import copy
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
    """Give each of our BN layers its qualified name in ``model``, used in error messages."""
    for name, m in model.named_modules():
        if isinstance(m, _OURS):
            m.layer_name = name or type(m).__name__
    return model


def _target_class(m: nn.Module, to: str) -> type[nn.Module] | None:
    source, target = (_TORCH, _OURS) if to == "batchnorm" else (_OURS, _TORCH)
    for src, dst in zip(source, target, strict=True):
        if type(m) is src:  # exact type: ours subclass torch's
            return dst
    return None


def _swap(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
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
    new.load_state_dict(m.state_dict(), strict=True)
    if m.affine:
        new.weight.requires_grad_(m.weight.requires_grad)
        if m.bias is not None:
            new.bias.requires_grad_(m.bias.requires_grad)
    new.train(m.training)
    return new


def convert(
    model: nn.Module, to: Literal["batchnorm", "torch"] = "batchnorm", *, inplace: bool = False
) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` by ours (``to="batchnorm"``) or the
    reverse (``to="torch"``), keeping parameters, statistics, ``requires_grad`` and train/eval state.

    Returns the converted model: a copy unless ``inplace=True``. Other layers (and torch's
    ``SyncBatchNorm``) are left alone.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: 'to' must be 'batchnorm' or 'torch', got {to!r}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"convert: lazy layer '{name or type(m).__name__}' is not initialized yet; run one "
                "forward pass first so that its shapes are known"
            )
    root = model if inplace else copy.deepcopy(model)
    cls = _target_class(root, to)
    if cls is not None:
        root = _swap(root, cls)
        return name_layers(root) if to == "batchnorm" else root
    swapped: dict[int, nn.Module] = {}  # a layer used in two places stays one layer
    for parent in list(root.modules()):
        # _modules, not named_children(): the latter skips a layer's second appearance
        for child_name, child in list(parent._modules.items()):
            cls = _target_class(child, to)
            if cls is not None:
                if id(child) not in swapped:
                    swapped[id(child)] = _swap(child, cls)
                setattr(parent, child_name, swapped[id(child)])
    return name_layers(root) if to == "batchnorm" else root
