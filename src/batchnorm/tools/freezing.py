"""Freezing BN: the statistics only (γ/β keep training), or the whole layer (a fixed affine map).

Two different needs that torch couples to ``train()``/``eval()`` and ``requires_grad``:

- Fine-tuning with frozen *statistics*: ``requires_grad=False`` does not stop training-mode
  forwards from overwriting ``running_mean``/``running_var``, and ``model.train()`` undoes any
  per-layer ``eval()`` (pytorch#86590, #66073). :func:`freeze_stats` makes training-mode forwards
  normalize with the population statistics and leave them alone, while γ, β and the input still
  get gradients, and it survives ``model.train()``.
- A *frozen layer*: BN as the fixed affine map of Alg. 2 line 11, with no parameters and no
  train mode at all (torchvision/detectron2's ``FrozenBatchNorm2d``, here for 1d/2d/3d):
  :func:`freeze`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import _OURS, _TORCH, check_initialized, name_layers, replace_modules, swap_class

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "freeze_stats",
    "unfreeze_stats",
]

_BatchNorm = nn.modules.batchnorm._BatchNorm


class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics and fixed affine parameters (Alg. 2 line 11):
    ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias``, per channel (dim 1).

    Everything is a buffer (``weight``, ``bias``, ``running_mean``, ``running_var``, as in
    torchvision's ``FrozenBatchNorm2d``), so nothing trains and ``train()`` changes nothing; the
    input still gets gradients. A BN ``state_dict`` loads with ``strict=True`` (its
    ``num_batches_tracked`` is ignored). This base class accepts any input of rank ≥ 2;
    :class:`FrozenBatchNorm1d`/``2d``/``3d`` check the rank like the BN layers do.
    """

    _ndims: tuple[int, ...] = ()  # () = any rank >= 2
    _shape_doc = "(N, C, ...)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}({num_features}): eps must be > 0, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.layer_name = ""
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, name: str = "") -> FrozenBatchNorm:
        """The frozen copy of ``bn``'s current eval-mode function (``bn`` needs running stats);
        ``name`` is used in error messages."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"freeze: {_describe(bn, name)} has no running statistics (track_running_stats=False), so it "
                "normalizes with batch statistics even in eval mode and has no fixed affine map "
                "to freeze. Estimate them first: construct it with track_running_stats=True and "
                "run batchnorm.tools.recalibrate."
            )
        ref = bn.running_mean
        frozen = cls(bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        frozen.layer_name = name or getattr(bn, "layer_name", "")
        return frozen

    def _where(self) -> str:
        name = f" '{self.layer_name}'" if self.layer_name else ""
        return f"{type(self).__name__}({self.num_features}){name}"

    def forward(self, input: Tensor) -> Tensor:
        if (
            input.dim() < 2
            or (self._ndims and input.dim() not in self._ndims)
            or input.shape[1] != self.num_features
        ):
            raise ValueError(
                f"{self._where()}: expected an input of shape {self._shape_doc} with "
                f"{self.num_features} channels in dimension 1, got shape {tuple(input.shape)}"
            )
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BN checkpoint loads strictly
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BN over ``(N, C)`` or ``(N, C, L)`` inputs; see :class:`FrozenBatchNorm`."""

    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BN over ``(N, C, H, W)`` inputs; see :class:`FrozenBatchNorm`."""

    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BN over ``(N, C, D, H, W)`` inputs; see :class:`FrozenBatchNorm`."""

    _ndims = (5,)
    _shape_doc = "(N, C, D, H, W)"


def _describe(m: nn.Module, name: str = "") -> str:
    name = name or getattr(m, "layer_name", "")
    return f"{type(m).__name__}({m.num_features})" + (f" '{name}'" if name else "")


def _frozen_class(bn: _BatchNorm) -> type[FrozenBatchNorm]:
    for cls, frozen in (
        (nn.BatchNorm1d, FrozenBatchNorm1d),
        (nn.BatchNorm2d, FrozenBatchNorm2d),
        (nn.BatchNorm3d, FrozenBatchNorm3d),
    ):
        if isinstance(bn, cls):  # ours subclass torch's
            return frozen
    return FrozenBatchNorm  # SyncBatchNorm and other ranks


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BN layer (ours, torch's, ``SyncBatchNorm``) by the :class:`FrozenBatchNorm` of
    its rank holding its current statistics and γ/β: the layer becomes the fixed affine map it
    computes in eval mode, in training mode too, and nothing in it trains.

    Returns the new model: a copy unless ``inplace=True``. Raises (before changing anything) for a
    BN layer without running statistics, which has no fixed map to freeze.
    """
    check_initialized(model, "freeze")
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            FrozenBatchNorm.from_batchnorm(m, name)  # raises, naming the layer
    root = model if inplace else copy.deepcopy(model)
    root = replace_modules(
        root,
        lambda m: _frozen_class(m).from_batchnorm(m) if isinstance(m, _BatchNorm) else None,
    )
    return name_layers(root)


def freeze_stats(model: nn.Module) -> nn.Module:
    """Keep every BN layer's population statistics fixed while γ/β keep training, in place.

    Training-mode forwards then normalize with ``running_mean``/``running_var`` (as eval does) and
    leave them untouched; γ, β and the input still receive gradients, and ``model.train()`` does
    not undo it (our layers' ``freeze_stats`` attribute). Eval mode is unaffected.

    torch's ``BatchNorm1d/2d/3d`` cannot do this across ``model.train()``, so they are replaced
    by ours holding the *same* parameter and buffer objects (same ``state_dict`` keys, same
    function; an optimizer built before this call keeps training them). They stay ours after
    :func:`unfreeze_stats`; ``batchnorm.convert(model, to="torch")`` turns them back.

    Like ``model.train()`` this changes ``model`` in place and returns it. Raises, before changing
    anything, for layers it cannot freeze: without running statistics, or ``SyncBatchNorm``
    (use :func:`freeze` there, or convert it to a plain BN layer first).
    """
    check_initialized(model, "freeze_stats")
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if m.running_mean is None:
            raise ValueError(
                f"freeze_stats: {_describe(m, name)} has no running statistics "
                "(track_running_stats=False); there is nothing to freeze: it always normalizes "
                "with batch statistics"
            )
        if not isinstance(m, _OURS) and type(m) not in _TORCH:
            raise TypeError(
                f"freeze_stats: {_describe(m, name)} is a {type(m).__module__}."
                f"{type(m).__name__}, which has no frozen-statistics mode; convert it to "
                "batchnorm.BatchNorm1d/2d/3d first, or freeze the whole layer with "
                "batchnorm.tools.freeze"
            )
    ours = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    model = replace_modules(
        model, lambda m: swap_class(m, ours[type(m)]) if type(m) in _TORCH else None
    )
    for m in model.modules():
        if isinstance(m, _OURS):
            m.freeze_stats = True
    return name_layers(model)


def unfreeze_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_stats`: training-mode forwards use and update batch statistics again.
    In place; returns ``model``."""
    for m in model.modules():
        if isinstance(m, _OURS):
            m.freeze_stats = False
    return model
