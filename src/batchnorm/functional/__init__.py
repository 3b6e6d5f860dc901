"""The BN transform as functions on tensors (arXiv:1502.03167, Alg. 1 and Alg. 2 line 11).

- :func:`batch_norm`: drop-in for :func:`torch.nn.functional.batch_norm`.
- :func:`batch_norm_train`: training mode with the batch statistics returned and the running
  statistics updated (EMA or cumulative) under a non-finite guard.
- :mod:`~batchnorm.functional.reference`: the line-by-line float64 oracle.
- :func:`moments`, :func:`normalize`, :func:`backward_reduce`, :func:`backward_elementwise`: the
  same computation in steps, for statistics combined across processes (SyncBatchNorm).
- :mod:`~batchnorm.functional.stats`: moments, Chan merges, the population estimators.
"""

from . import kernels, reference, stats, steps
from .autograd import BatchNormFunction
from .core import (
    BACKENDS,
    BatchStats,
    batch_norm,
    batch_norm_train,
    current_backend,
    select_backend,
    use_backend,
)
from .stats import Moments, PopulationStats, merge_moments
from .steps import backward_elementwise, backward_reduce, moments, normalize

__all__ = [
    "BACKENDS",
    "BatchNormFunction",
    "BatchStats",
    "Moments",
    "PopulationStats",
    "backward_elementwise",
    "backward_reduce",
    "batch_norm",
    "batch_norm_train",
    "current_backend",
    "kernels",
    "merge_moments",
    "moments",
    "normalize",
    "reference",
    "select_backend",
    "stats",
    "steps",
    "use_backend",
]
