"""Instruments for *why* BN works: the paper's explanations (arXiv:1502.03167) and Santurkar et
al.'s critique (arXiv:1805.11604) as measurements on any ``nn.Module``.

- :class:`ShiftTracker`: per-unit percentiles, mean and std of chosen modules' inputs on fixed
  held-out batches over training — Figure 1(b, c) for every layer — and drift summaries that an
  early chance-level phase does not dominate (internal covariate shift as the paper shows it,
  Sec. 1–2, 4.1).
- :func:`internal_covariate_shift`: ‖G_k − G'_k‖ and cos(G_k, G'_k), the change of layer k's
  gradient when the layers below take their update (Santurkar et al. Definition 2.1), with any
  torch optimizer.
- :func:`smoothness`: the loss and gradient along the gradient step at lr × [0.05, 4] and the
  effective β-smoothness (Santurkar et al. Sec. 3.1).
- :func:`scale_check`: W → aW, measured ratios of the loss, the weight gradient (1/a) and the
  gradient reaching the layer's input (1) (Sec. 3.3).
- :class:`~batchnorm.nn.NoisyBatchNorm1d` (in :mod:`batchnorm.nn`): BN with time-varying random
  per-unit scale and shift (Santurkar et al. Sec. 2.1).

Each leaves the model, the optimizer and every random stream exactly as it found them, also when
it fails (:mod:`._common`), so a training run is bitwise the same with and without it; each
states its cost in its docstring. ``docs/instruments.md`` is the user guide.
"""

from .ics import ICSReport, LayerICS, internal_covariate_shift
from .scale import ScaleCheck, ScaleReport, scale_check
from .shift import DriftSummary, LayerShift, ShiftReport, ShiftTracker
from .smoothness import DEFAULT_FACTORS, SmoothnessReport, smoothness

__all__ = [
    "DEFAULT_FACTORS",
    "DriftSummary",
    "ICSReport",
    "LayerICS",
    "LayerShift",
    "ScaleCheck",
    "ScaleReport",
    "ShiftReport",
    "ShiftTracker",
    "SmoothnessReport",
    "internal_covariate_shift",
    "scale_check",
    "smoothness",
]
