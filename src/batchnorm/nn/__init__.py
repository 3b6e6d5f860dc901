"""Batch Normalization modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` and
``torch.nn.SyncBatchNorm``, and Batch Renormalization, Ghost BN and noisy BN (Santurkar et al.'s
experiment, arXiv:1805.11604) on the same machinery."""

from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, StatsMode
from .noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "StatsMode",
    "SyncBatchNorm",
]
