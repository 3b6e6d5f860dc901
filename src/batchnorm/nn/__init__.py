"""Batch Normalization modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` and
``torch.nn.SyncBatchNorm``."""

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, StatsMode
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "StatsMode", "SyncBatchNorm"]
