"""Swap a model's BN layers for :class:`~batchnorm.nn.SyncBatchNorm` and back.

``convert_sync`` is ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for our layer, plus the way
back, which torch does not have: after synchronized training, ``convert_from_sync`` returns the
model to per-process layers (for single-process evaluation, export, or fine-tuning). Both keep
parameters, running statistics, ``requires_grad`` and the train/eval state; between our own
layers they also keep ``stats_mode``, ``guard_nonfinite``, ``freeze_stats`` and the counters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from ..nn.modules import _BatchNormMixin
from .convert import name_layers

__all__ = ["convert_from_sync", "convert_sync"]

# Exact types (subclasses such as timm's BatchNormAct2d add behaviour we would drop).
_TO_SYNC = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)
_BY_INPUT_DIM = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


def convert_sync(
    model: nn.Module, process_group: Any | None = None, *, inplace: bool = False
) -> nn.Module:
    """Replace every BN layer of ``model`` by :class:`~batchnorm.nn.SyncBatchNorm`.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and our
    ``BatchNorm1d/2d/3d`` (exact types; subclasses, layers that already are our
    ``SyncBatchNorm`` and other layers are left alone). The new layers synchronize over
    ``process_group`` (default: the whole world, looked up at each forward, so the conversion may
    happen before ``init_process_group``) and remember their original class for
    :func:`convert_from_sync`. Call it before wrapping the model in ``DistributedDataParallel``.

    Returns the converted model: a copy unless ``inplace=True``. In place, the new layers hold the
    same parameter and buffer tensors as the old ones (as torch's ``convert_sync_batchnorm``
    does), so an optimizer built before the conversion keeps working.
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) not in _TO_SYNC:
            return None
        new = _swap(m, SyncBatchNorm)
        new.process_group = process_group
        new.plain_class = type(m)
        return new

    return _replace(model, make, inplace, "convert_sync")


def convert_from_sync(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every :class:`~batchnorm.nn.SyncBatchNorm` of ``model`` by a per-process BN layer.

    The new layer is of the class :func:`convert_sync` converted from (e.g. ``torch.nn.BatchNorm2d``
    comes back as ``torch.nn.BatchNorm2d``); for a layer that was built as ``SyncBatchNorm``, our
    ``BatchNorm1d/2d/3d`` chosen by the rank of the last input it saw. Returns the converted model:
    a copy unless ``inplace=True`` (then sharing parameter and buffer tensors, as above).
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) is not SyncBatchNorm:
            return None
        cls = m.plain_class or _BY_INPUT_DIM.get(m.last_input_dim)
        if cls is None:
            raise ValueError(
                f"convert_from_sync: cannot tell whether {m._where()} should become BatchNorm1d, "
                "2d or 3d: it was not made by convert_sync and has not seen an input yet. Run one "
                "forward pass first."
            )
        new = _swap(m, cls)
        if isinstance(new, nn.SyncBatchNorm):
            new.process_group = m.process_group
        return new

    return _replace(model, make, inplace, "convert_from_sync")


def _swap(m: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` layer with ``m``'s settings, holding ``m``'s parameter and buffer tensors (so
    ``requires_grad`` and the statistics come along), in ``m``'s train/eval mode."""
    ref = m.weight if m.weight is not None else m.running_mean
    new = cls(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        bias=m.bias is not None if m.affine else True,
        **({"device": ref.device, "dtype": ref.dtype} if ref is not None else {}),
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = m._buffers.get(name)
    if isinstance(m, _BatchNormMixin) and isinstance(new, _BatchNormMixin):
        new._buffers["nonfinite_skips"] = m.nonfinite_skips
        new.guard_nonfinite, new.freeze_stats = m.guard_nonfinite, m.freeze_stats
        if m.stats_mode == "population":
            new.stats_mode = "population"
            new._population = m.population
    new.train(m.training)
    return new


def _replace(
    model: nn.Module, make: Callable[[nn.Module], nn.Module | None], inplace: bool, tool: str
) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every module ``m`` for which ``make(m)`` returns a
    module replaced by it, the root included; a layer used in two places stays one layer."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{tool}: lazy layer '{name or type(m).__name__}' is not initialized yet; run one "
                "forward pass first so that its shapes are known"
            )
    # A process group cannot be deep-copied: the copy shares it.
    groups = {id(m.process_group): m.process_group for m in model.modules() if _has_group(m)}
    root = model if inplace else copy.deepcopy(model, memo=groups)
    new_root = make(root)
    if new_root is None:
        done: dict[int, nn.Module | None] = {}
        for parent in list(root.modules()):
            # _modules, not named_children(): the latter skips a layer's second appearance
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) not in done:
                    done[id(child)] = make(child)
                if child is not None and done[id(child)] is not None:
                    parent._modules[child_name] = done[id(child)]
        new_root = root
    for name, m in new_root.named_modules():  # names for error messages
        if isinstance(m, SyncBatchNorm):
            m.layer_name = name or type(m).__name__
    return name_layers(new_root)


def _has_group(m: nn.Module) -> bool:
    return getattr(m, "process_group", None) is not None
