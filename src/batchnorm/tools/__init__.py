"""Tools on whole models: Algorithm 2 of arXiv:1502.03167 as a procedure.

- :func:`add_batchnorm`: insert BN before the nonlinearities, drop the redundant biases (lines 1–2).
- :func:`recalibrate`: estimate the population statistics with the weights frozen (lines 8–10).
- :func:`freeze_stats` / :func:`unfreeze_stats`: keep the statistics fixed while γ/β train;
  :func:`freeze`: turn BN layers into fixed affine layers (:class:`FrozenBatchNorm2d`, ...).
- :func:`fold`: fold each BN into the layer next to it for inference (line 11), checked on a
  probe input; the algebra as functions on tensors (:func:`bn_scale_shift`,
  :func:`fold_bn_into_layer`, :func:`fold_bn_into_next_layer`) and on module pairs
  (:func:`fold_modules`).
- :func:`accumulate_statistics`: with gradient accumulation, one running-statistics update per
  effective batch instead of one per micro-batch.
- :func:`diagnose`: per-layer health in eval mode — running statistics against the data reaching
  each layer, dead channels, collapsed γ, non-finite state — with advice; :func:`nonfinite_skips`:
  each layer's count of training steps the non-finite guard skipped.
- :func:`convert`: swap torch's BN layers for ours and back; :func:`convert_sync` /
  :func:`convert_from_sync`: to :class:`~batchnorm.nn.SyncBatchNorm` and back.

Instruments for why BN works (:mod:`batchnorm.tools.instruments`): :class:`ShiftTracker`
(Figure 1(b, c) for any layer), :func:`internal_covariate_shift` (Santurkar et al.'s ICS),
:func:`smoothness` (the landscape along the step), :func:`scale_check` (Sec. 3.3).
"""

from ..nn.sync import convert_from_sync, convert_sync
from ._graph import ModelTraceError
from .accumulate import accumulate_statistics
from .convert import bn_layers, convert, name_layers
from .diagnose import BNHealthReport, LayerHealth, diagnose, nonfinite_skips
from .folding import (
    ChannelAffine,
    FoldResult,
    bn_scale_shift,
    fold,
    fold_bn_into_layer,
    fold_bn_into_next_layer,
    fold_modules,
)
from .freezing import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    freeze_stats,
    unfreeze_stats,
)
from .insert import LAYERS, NONLINEARITIES, add_batchnorm
from .instruments import (
    DriftSummary,
    ICSReport,
    LayerICS,
    LayerShift,
    ScaleCheck,
    ScaleReport,
    ShiftReport,
    ShiftTracker,
    SmoothnessReport,
    internal_covariate_shift,
    scale_check,
    smoothness,
)
from .recalibration import LayerRecalibration, RecalibrationReport, recalibrate

__all__ = [
    "LAYERS",
    "NONLINEARITIES",
    "BNHealthReport",
    "ChannelAffine",
    "DriftSummary",
    "FoldResult",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "ICSReport",
    "LayerHealth",
    "LayerICS",
    "LayerRecalibration",
    "LayerShift",
    "ModelTraceError",
    "RecalibrationReport",
    "ScaleCheck",
    "ScaleReport",
    "ShiftReport",
    "ShiftTracker",
    "SmoothnessReport",
    "accumulate_statistics",
    "add_batchnorm",
    "bn_layers",
    "bn_scale_shift",
    "convert",
    "convert_from_sync",
    "convert_sync",
    "diagnose",
    "fold",
    "fold_bn_into_layer",
    "fold_bn_into_next_layer",
    "fold_modules",
    "freeze",
    "freeze_stats",
    "internal_covariate_shift",
    "name_layers",
    "nonfinite_skips",
    "recalibrate",
    "scale_check",
    "smoothness",
    "unfreeze_stats",
]
