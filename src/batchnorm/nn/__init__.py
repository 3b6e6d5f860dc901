"""Batch Normalization modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``."""

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, StatsMode

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "StatsMode"]
