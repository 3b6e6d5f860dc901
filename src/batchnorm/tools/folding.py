"""Fold BN away for inference (Alg. 2 line 11 of arXiv:1502.03167).

In eval mode BN is one fixed affine map per channel,

    y = γ / sqrt(Var[x] + ε) · x + (β − γ E[x] / sqrt(Var[x] + ε)) = scale · x + shift,

so it merges into the linear layer next to it and inference pays nothing for it:

- after a layer ``z = W u + b`` (Linear, Conv, ConvTranspose, any groups): ``W' = scale ⊙ W``
  along the output channels and ``b' = scale · b + shift``;
- before a layer, ``W (scale ⊙ x + shift) + b``: ``W' = W ⊙ scale`` along the input channels and
  ``b' = b + W · shift``. Exact for Linear on ``(N, C)`` inputs and for Conv when no zero padding
  is added (zero-padding the normalized input is not the same as zero-padding the raw input;
  reflect/replicate/circular padding commute with a per-channel affine map, so those fold).

Pure functions on tensors (:func:`bn_scale_shift`, :func:`fold_bn_into_layer`,
:func:`fold_bn_into_next_layer`), a wrapper for a pair of modules (:func:`fold_modules`) and one
for whole models (:func:`fold`). All arithmetic is done in float64 and rounded once, to the
layer's dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._graph import ModelTraceError, call_counts, trace_skipping
from .convert import check_initialized, replace_modules
from .freezing import FrozenBatchNorm

__all__ = [
    "ChannelAffine",
    "FoldResult",
    "bn_scale_shift",
    "fold",
    "fold_bn_into_layer",
    "fold_bn_into_next_layer",
    "fold_modules",
]

_BatchNorm = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_NDIM = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}
_CONV_NDIM |= {t: n for t, n in zip(_CONV_T, (3, 4, 5), strict=True)}

# Default probe-check tolerance, relative to the largest output magnitude, by output dtype.
DEFAULT_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


# -- the algebra, on tensors --------------------------------------------------------------------


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """BN's eval-mode map as ``y = scale · x + shift`` per channel (Alg. 2 line 11), in float64:
    ``scale = γ / sqrt(Var[x] + ε)``, ``shift = β − E[x] · scale`` (γ = 1, β = 0 if absent)."""
    scale = torch.rsqrt(running_var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def _trailing(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


def fold_bn_into_layer(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``BN(layer(u))`` as one layer: ``W' = scale ⊙ W`` (per output channel) and
    ``b' = scale · b + shift``.

    ``weight`` is a Linear ``(out, in)``, Conv ``(out, in/groups, *k)`` or, with
    ``transposed=True``, ConvTranspose ``(in, out/groups, *k)`` weight. Computed in float64,
    returned in ``weight``'s dtype; the new bias always exists.
    """
    w = weight.detach().double()
    scale, shift = scale.double().to(w.device), shift.double().to(w.device)
    if transposed:  # weight[i, j] feeds output channel (group of i) · out/groups + j
        in_ch, out_per_group = w.shape[0], w.shape[1]
        s = scale.reshape(groups, 1, out_per_group).expand(groups, in_ch // groups, out_per_group)
        w = w * _trailing(s.reshape(in_ch, out_per_group), w.dim())
    else:
        w = w * _trailing(scale, w.dim())
    b = shift if bias is None else bias.detach().double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_bn_into_next_layer(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer(BN(x))`` as one layer: ``W' = W ⊙ scale`` (per input channel) and
    ``b' = b + W · shift`` (summed over the kernel).

    ``weight`` is a Linear ``(out, in)`` or Conv ``(out, in/groups, *k)`` weight. Exact only if
    the layer adds no zero padding (see the module docstring); :func:`fold_modules` checks that.
    """
    w = weight.detach().double()
    scale, shift = scale.double().to(w.device), shift.double().to(w.device)
    out_ch, in_per_group = w.shape[0], w.shape[1]

    def per_output(v: Tensor) -> Tensor:  # (C_in,) -> (out, in/groups): the inputs each o sees
        v = v.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group)
        return _trailing(v.reshape(out_ch, in_per_group), w.dim())

    b = (w * per_output(shift)).sum(dim=tuple(range(1, w.dim())))
    if bias is not None:
        b = b + bias.detach().double()
    return (w * per_output(scale)).to(weight.dtype), b.to(weight.dtype)


# -- modules -------------------------------------------------------------------------------------


class ChannelAffine(nn.Module):
    """One fixed per-channel affine map ``y = scale · x + shift`` over dimension 1: what
    :func:`fold` leaves where a BN layer has no neighbour to fold into. Buffers only."""

    def __init__(self, scale: Tensor, shift: Tensor, layer_name: str = "") -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.layer_name = layer_name

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.scale.shape[0]:
            raise ValueError(
                "ChannelAffine '" + self.layer_name + "': expected an input of shape (N, C, ...) "
                "with C = " + str(self.scale.shape[0]) + ", got shape " + str(list(input.shape))
            )
        shape = [1, -1] + [1] * (input.dim() - 2)
        return input * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}"


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm))


def _describe(m: nn.Module, name: str = "") -> str:
    name = name or getattr(m, "layer_name", "")
    return f"{type(m).__name__}({m.num_features})" + (f" '{name}'" if name else "")


def _check_foldable(bn: nn.Module, name: str = "") -> None:
    """Raise unless ``bn`` currently computes a fixed affine map."""
    if isinstance(bn, FrozenBatchNorm):
        return
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"fold: {_describe(bn, name)} has no running statistics (track_running_stats=False): "
            "it normalizes with batch statistics even in eval mode, so it is no fixed affine map "
            "and cannot be folded. Give it running statistics (track_running_stats=True) and "
            "estimate them with batchnorm.tools.recalibrate."
        )
    if bn.training and not getattr(bn, "freeze_stats", False):
        raise ValueError(
            f"fold: {_describe(bn, name)} is in training mode, where it normalizes with batch "
            "statistics; folding uses the population statistics (Alg. 2 line 11). Call "
            "model.eval() first."
        )


def _scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _with_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return new


def _zero_padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding commutes with a per-channel affine map
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _why_not_into(layer: nn.Module, bn: nn.Module, ndim: int | None) -> str | None:
    """Why BN(layer(x)) cannot be one layer, or None if it can."""
    if type(layer) is nn.Linear:
        if layer.out_features != bn.num_features:
            return f"its {layer.out_features} outputs are not BN's {bn.num_features} channels"
        if ndim not in (None, 2):
            return "the Linear output is not (N, features), so BN's channels are not its outputs"
        return None
    if type(layer) in _CONV_NDIM:
        if layer.out_channels != bn.num_features:
            return f"its {layer.out_channels} channels are not BN's {bn.num_features}"
        if ndim not in (None, _CONV_NDIM[type(layer)]):
            return "the convolution's input has no batch dimension"
        return None
    return f"{type(layer).__name__} is not a Linear/Conv/ConvTranspose layer"


def _why_not_into_next(bn: nn.Module, layer: nn.Module, ndim: int | None) -> str | None:
    """Why layer(BN(x)) cannot be one layer, or None if it can."""
    if type(layer) is nn.Linear:
        if layer.in_features != bn.num_features:
            return f"its {layer.in_features} inputs are not BN's {bn.num_features} channels"
        if ndim not in (None, 2):
            return "the Linear input is not (N, features), so BN's channels are not its inputs"
        return None
    if type(layer) in _CONV:
        if layer.in_channels != bn.num_features:
            return f"its {layer.in_channels} input channels are not BN's {bn.num_features}"
        if ndim not in (None, _CONV_NDIM[type(layer)]):
            return "the convolution's input has no batch dimension"
        if _zero_padded(layer):
            return "the next convolution zero-pads its input, which does not commute with BN"
        return None
    if type(layer) in _CONV_T:
        return "a transposed convolution after BN sums the shift unevenly at the borders"
    return f"{type(layer).__name__} is not a Linear/Conv layer"


def fold_modules(first: nn.Module, second: nn.Module) -> nn.Module:
    """Fold an eval-mode BN layer and the linear layer next to it into one new layer.

    ``fold_modules(layer, bn)`` is ``bn(layer(x))`` with ``layer`` a ``Linear``, ``Conv1d/2d/3d``
    or ``ConvTranspose1d/2d/3d`` (any groups, with or without bias); ``fold_modules(bn, layer)``
    is ``layer(bn(x))`` with ``layer`` a ``Linear`` (on ``(N, C)`` inputs) or a ``Conv`` that adds
    no zero padding. Both arguments are left untouched; the new layer always has a bias.
    Raises ``ValueError`` (naming the layers) for a BN in training mode or without running
    statistics, or a pair that does not fold exactly.
    """
    if _is_bn(second) and not _is_bn(first):
        _check_foldable(second)
        why = _why_not_into(first, second, None)
        if why is not None:
            raise ValueError(f"fold_modules: cannot fold {_describe(second)} into the layer: {why}")
        w, b = fold_bn_into_layer(
            first.weight,
            first.bias,
            *_scale_shift(second),
            transposed=type(first) in _CONV_T,
            groups=getattr(first, "groups", 1),
        )
        return _with_weights(first, w, b)
    if _is_bn(first) and not _is_bn(second):
        _check_foldable(first)
        why = _why_not_into_next(first, second, None)
        if why is not None:
            raise ValueError(
                f"fold_modules: cannot fold {_describe(first)} into the next layer: {why}"
            )
        w, b = fold_bn_into_next_layer(
            second.weight, second.bias, *_scale_shift(first), groups=getattr(second, "groups", 1)
        )
        return _with_weights(second, w, b)
    raise TypeError(
        "fold_modules: expected one BN layer and one Linear/Conv layer, in the order they run; "
        f"got {type(first).__name__} then {type(second).__name__}"
    )


def _affine(bn: nn.Module, name: str) -> ChannelAffine:
    scale, shift = _scale_shift(bn)
    dtype = bn.running_mean.dtype
    return ChannelAffine(scale.to(dtype), shift.to(dtype), name)


# -- whole models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldResult:
    """What :func:`fold` did and how well the folded model matches the original on the probe.

    Attributes:
        model: the folded model (a new one; no BN layers left).
        folded: ``(bn_name, layer_name)`` for each BN folded into a Linear/Conv layer.
        affine: ``(bn_name, reason)`` for each BN that became a :class:`ChannelAffine`.
        max_abs_diff: ``max |folded(probe) − model(probe)|`` over every output element.
        max_rel_diff: ``max_abs_diff / max |model(probe)|`` (relative to the output's scale).
    """

    model: nn.Module
    folded: tuple[tuple[str, str], ...]
    affine: tuple[tuple[str, str], ...]
    max_abs_diff: float
    max_rel_diff: float

    def __str__(self) -> str:
        lines = [
            f"fold: {len(self.folded)} BN layer(s) folded into the layer next to them, "
            f"{len(self.affine)} turned into a per-channel affine op; on the probe input "
            f"max |diff| = {self.max_abs_diff:.3g}, relative to max |output| = "
            f"{self.max_rel_diff:.3g}"
        ]
        lines += [f"  {bn} -> {layer}" for bn, layer in self.folded]
        lines += [f"  {bn} -> ChannelAffine ({why})" for bn, why in self.affine]
        return "\n".join(lines)


def _leaves(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _graphs(module: nn.Module, prefix: str, leaf_types: tuple[type, ...]) -> list:
    """(name prefix, graph, root) for every part of ``module`` that torch.fx can trace: the whole
    model if it can; otherwise untraceable submodules become opaque and are traced on their own,
    and a module whose own forward cannot be traced is replaced by its children."""

    def join(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else prefix or name

    if isinstance(module, leaf_types):
        return []
    try:
        graph, skipped = trace_skipping(module, leaf_types, lambda m: True, tool="fold", advice="")
    except ModelTraceError:
        return [
            g
            for name, child in module.named_children()
            for g in _graphs(child, join(name), leaf_types)
        ]
    parts = [(prefix, graph, module)]
    for name, sub in skipped.items():
        parts += _graphs(sub, join(name), leaf_types)
    return parts


def _plan(model: nn.Module, ndims: dict[int, int]) -> tuple[dict, dict, dict]:
    """Decide, for each BN call in the traced parts of ``model``, where it folds.

    Returns ``into`` (id(bn) -> (layer name, layer)), ``into_next`` (same, for BN folded into the
    following layer) and ``why_not`` (id(bn) -> reason it stays an affine op)."""
    leaf_types = (_BatchNorm, FrozenBatchNorm, ChannelAffine, *_CONV_NDIM, nn.Linear)
    parts = _graphs(model, "", leaf_types)
    counts: dict[int, int] = {}
    read: set[int] = set()  # modules whose parameters forward also reads directly (get_attr)
    for _, graph, root in parts:
        for key, n in call_counts(root, graph).items():
            counts[key] = counts.get(key, 0) + n
        for node in graph.nodes:
            if node.op == "get_attr":
                read.add(id(root.get_submodule(node.target.rpartition(".")[0])))
    into: dict[int, tuple[str, nn.Module]] = {}
    into_next: dict[int, tuple[str, nn.Module]] = {}
    why_not: dict[int, str] = {}

    def called_once(node: fx.Node, root: nn.Module) -> nn.Module | None:
        if node.op != "call_module":
            return None
        m = root.get_submodule(node.target)
        return m if counts.get(id(m)) == 1 and id(m) not in read else None

    for prefix, graph, root in parts:

        def full(n: fx.Node, prefix: str = prefix) -> str:
            return f"{prefix}.{n.target}" if prefix else str(n.target)

        for node in graph.nodes:
            if node.op != "call_module" or not _is_bn(bn := root.get_submodule(node.target)):
                continue
            if counts[id(bn)] > 1:
                why_not[id(bn)] = f"called {counts[id(bn)]} times"
                continue
            ndim = ndims.get(id(bn))
            if ndim is None:
                why_not[id(bn)] = "not reached by the probe input"
                continue
            reasons = []
            arg = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            prev = called_once(arg, root) if isinstance(arg, fx.Node) else None
            if prev is None:
                reasons.append("its input is not the output of a layer called once")
            elif len(arg.users) > 1:
                reasons.append(f"the output of '{full(arg)}' is also used elsewhere")
            elif (why := _why_not_into(prev, bn, ndim)) is not None:
                reasons.append(f"'{full(arg)}': {why}")
            else:  # prev's only user is this BN: no other BN can fold into it from this side
                into[id(bn)] = (full(arg), prev)
                continue
            users = list(node.users)
            nxt = called_once(users[0], root) if len(users) == 1 else None
            if nxt is None or users[0].args != (node,) or users[0].kwargs:
                reasons.append("its output does not go only to a layer called once")
            elif (why := _why_not_into_next(bn, nxt, ndim)) is not None:
                reasons.append(f"'{full(users[0])}': {why}")
            else:  # nxt's only input is this BN
                into_next[id(bn)] = (full(users[0]), nxt)
                continue
            why_not[id(bn)] = "; ".join(reasons)
    return into, into_next, why_not


@torch.no_grad()
def fold(
    model: nn.Module,
    example_inputs: Tensor | tuple,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
) -> FoldResult:
    """Fold every BN layer of an eval-mode ``model`` into the layer next to it (Alg. 2 line 11).

    Each BN (ours, torch's, ``SyncBatchNorm``, :class:`FrozenBatchNorm`) whose input is the
    output of a ``Linear``/``Conv``/``ConvTranspose`` layer used nowhere else is folded into that
    layer (:func:`fold_bn_into_layer`); else, if its output goes only to a ``Linear`` or a ``Conv``
    without zero padding, into that one (:func:`fold_bn_into_next_layer`); else it becomes one
    :class:`ChannelAffine` op. Folded BN layers become ``nn.Identity``; the result has no BN
    layers, keeps ``model``'s classes and structure (so it scripts with TorchScript if ``model``
    does) and exports to ONNX without ``BatchNormalization`` nodes.

    Which layer feeds which comes from a ``torch.fx`` trace. Parts that cannot be traced are
    traced on their own, module by module; a BN whose neighbours cannot be seen that way is
    turned into an affine op, never folded on a guess.

    The result checks itself: ``example_inputs`` (a tensor, or a tuple of forward's arguments) is
    run through ``model`` and the folded model, and if ``max |diff| > atol + rtol · max |output|``
    a ``ValueError`` is raised. ``rtol`` defaults by output dtype (1e-4 for float32, 1e-10 for
    float64; folding in float32 changes rounding, see :class:`FoldResult`). The probe must reach
    every BN layer: BNs it does not reach become affine ops.

    Raises ``ValueError`` for a BN layer in training mode (unless its ``freeze_stats`` is set) or
    without running statistics. ``model`` is not modified.
    """
    check_initialized(model, "fold")
    bns = [(name, m) for name, m in model.named_modules() if _is_bn(m)]
    for name, bn in bns:
        _check_foldable(bn, name)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    new = copy.deepcopy(model)
    names = {id(m): name for name, m in new.named_modules() if _is_bn(m)}

    ndims: dict[int, int] = {}

    def record(module: nn.Module, inputs: tuple) -> None:
        ndims[id(module)] = inputs[0].dim()

    hooks = [m.register_forward_pre_hook(record) for m in new.modules() if _is_bn(m)]
    try:
        reference = _leaves(new(*args))
    finally:
        for h in hooks:
            h.remove()

    into, into_next, why_not = _plan(new, ndims)
    replaced: dict[int, nn.Module] = {}  # layer id -> its folded version (a layer may take two)
    folded, affine = [], []
    for bn_id, name in names.items():
        bn = new.get_submodule(name)
        if bn_id in into or bn_id in into_next:
            layer_name, layer = into[bn_id] if bn_id in into else into_next[bn_id]
            current = replaced.get(id(layer), layer)
            pair = (current, bn) if bn_id in into else (bn, current)
            replaced[id(layer)] = fold_modules(*pair)
            folded.append((name, layer_name))
        else:
            affine.append((name, why_not.get(bn_id, "not inside a part torch.fx can trace")))

    identity = set(into) | set(into_next)

    def swap(m: nn.Module) -> nn.Module | None:
        if id(m) in replaced:
            return replaced[id(m)]
        if id(m) in identity:
            return nn.Identity()
        if _is_bn(m):
            return _affine(m, names[id(m)])
        return None

    new = replace_modules(new, swap)
    assert not any(_is_bn(m) for m in new.modules())  # every BN is folded or affine

    outputs = _leaves(new(*args))
    if len(outputs) != len(reference) or not reference:
        raise RuntimeError("fold: the folded model's outputs differ in structure from the model's")
    max_abs = max(
        float((o.double() - r.double()).abs().max())
        for o, r in zip(outputs, reference, strict=True)
    )
    scale = max(float(r.double().abs().max()) for r in reference)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    result = FoldResult(new, tuple(folded), tuple(affine), max_abs, max_rel)
    if rtol is None:
        rtol = DEFAULT_RTOL.get(reference[0].dtype, 1e-4)
    if not max_abs <= atol + rtol * scale:  # also catches NaN
        training = [n or type(m).__name__ for n, m in model.named_modules() if m.training]
        hint = (
            f" Modules in training mode (Dropout there makes outputs random): {training[:5]}."
            if training
            else ""
        )
        raise ValueError(
            f"fold: the folded model differs from the model on the probe input by max |diff| = "
            f"{max_abs:.3g} ({max_rel:.3g} of max |output|), above atol + rtol · max |output| = "
            f"{atol:g} + {rtol:g} · {scale:.3g}.{hint} Raise rtol/atol if this is rounding "
            f"(e.g. float16), else please report it.\n{result}"
        )
    return result
