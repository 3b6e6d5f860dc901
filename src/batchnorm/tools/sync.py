"""Swap a model's BN layers for :class:`~batchnorm.nn.SyncBatchNorm` and back.

``convert_sync`` is ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for our layer, plus the way
back, which torch does not have: after synchronized training, ``convert_from_sync`` returns the
model to per-process layers (for single-process evaluation, export, or fine-tuning). Both keep
parameters, running statistics, ``requires_grad`` and the train/eval state; between our own
layers they also keep ``stats_mode``, ``guard_nonfinite``, ``freeze_stats`` and the counters.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from .convert import copy_model, name_layers, replace_modules, swap_class

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
        new = swap_class(m, SyncBatchNorm)
        new.process_group = process_group
        new.plain_class = type(m)
        return new

    return name_layers(replace_modules(copy_model(model, "convert_sync", inplace), make))


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
        new = swap_class(m, cls)
        if isinstance(new, nn.SyncBatchNorm):
            new.process_group = m.process_group
        return new

    return name_layers(replace_modules(copy_model(model, "convert_from_sync", inplace), make))
