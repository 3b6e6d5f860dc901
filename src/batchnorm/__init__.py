"""batchnorm: Batch Normalization (Ioffe & Szegedy, 2015, arXiv:1502.03167) as real software.

Layers (:mod:`batchnorm.nn`), the BN transform as functions (:mod:`batchnorm.functional`) and
tools on whole models (:mod:`batchnorm.tools`). The experiments and the CLI live in
:mod:`batchnorm.experiments` and :mod:`batchnorm.cli`; the library never imports them.
"""

from . import functional, nn, tools
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyBatchNorm3d,
    SyncBatchNorm,
)
from .tools import (
    accumulate_statistics,
    add_batchnorm,
    convert,
    convert_from_sync,
    convert_sync,
    diagnose,
    fold,
    freeze,
    freeze_stats,
    recalibrate,
    unfreeze_stats,
)

__version__ = "0.1.0"

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
    "SyncBatchNorm",
    "__version__",
    "accumulate_statistics",
    "add_batchnorm",
    "convert",
    "convert_from_sync",
    "convert_sync",
    "diagnose",
    "fold",
    "freeze",
    "freeze_stats",
    "functional",
    "nn",
    "recalibrate",
    "tools",
    "unfreeze_stats",
]
