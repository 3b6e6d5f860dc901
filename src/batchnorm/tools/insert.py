"""Put BN into a network the way Algorithm 2 lines 1–2 and Sec. 3.2 of arXiv:1502.03167 say.

"We add the BN transform immediately before the nonlinearity, by normalizing x = Wu + b"; since
the mean subtraction cancels b, "the bias b can be ignored": z = g(BN(Wu)).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Collection

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._graph import call_counts, module_paths, trace_skipping
from .convert import check_initialized, name_layers

__all__ = ["LAYERS", "NONLINEARITIES", "add_batchnorm"]

# The layers that compute x = Wu + b, with the BN class for their output. Exact types: a subclass
# may override forward (e.g. weight standardization), and then it is not "Wu + b" any more.
LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BatchNorm1d,
    nn.Conv1d: BatchNorm1d,
    nn.Conv2d: BatchNorm2d,
    nn.Conv3d: BatchNorm3d,
    nn.ConvTranspose1d: BatchNorm1d,
    nn.ConvTranspose2d: BatchNorm2d,
    nn.ConvTranspose3d: BatchNorm3d,
}

# Elementwise nonlinearities g, as modules, functions (F.relu, torch.tanh, ...) and tensor methods
# (x.relu()). Not included: softmax/log-softmax (output normalizations, normally part of the
# loss), dropout, pooling and reshapes (a layer followed by one of these, then by g, gets no BN).
NONLINEARITIES: tuple[type[nn.Module] | object, ...] = (
    # modules
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Softshrink,
    nn.Hardshrink,
    # functions
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.leaky_relu_,
    F.prelu,
    F.rrelu,
    F.elu,
    F.elu_,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.sigmoid,
    F.tanh,
    F.hardtanh,
    F.hardtanh_,
    F.hardsigmoid,
    F.hardswish,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    F.threshold,
    F.softshrink,
    F.hardshrink,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.sigmoid_,
    torch.tanh,
    torch.tanh_,
    torch.selu,
    torch.celu,
    torch.rrelu,
    # tensor methods, by name
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
)

_ADVICE = (
    "Make that forward traceable, or call add_batchnorm on the traceable parts of the model "
    "(e.g. each nn.Sequential inside it) and put those back."
)


def _is_nonlinearity(node: fx.Node, model: nn.Module, nonlinearities: Collection[object]) -> bool:
    classes = tuple(g for g in nonlinearities if isinstance(g, type))
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), classes)
    if node.op == "call_function":
        return any(node.target is g for g in nonlinearities)
    if node.op == "call_method":
        return node.target in nonlinearities
    return False


def _feeds_nonlinearity(
    node: fx.Node, model: nn.Module, nonlinearities: Collection[object]
) -> bool:
    """The layer's output goes to one place only, and that is the first argument of g."""
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return (
        bool(user.args) and user.args[0] is node and _is_nonlinearity(user, model, nonlinearities)
    )


def add_batchnorm(
    model: nn.Module,
    *,
    skip_last: bool = False,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    nonlinearities: Collection[object] = NONLINEARITIES,
) -> nn.Module:
    """A copy of ``model`` with a BN layer between every ``Linear``/``Conv`` and the nonlinearity it
    feeds (Alg. 2 lines 1–2, Sec. 3.2): ``g(Wu + b)`` becomes ``g(BN(Wu))``.

    Which layers get BN: every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
    (exactly these classes, see :data:`LAYERS`) whose output is used once, as the input of a
    nonlinearity. The nonlinearities are the elementwise activations of :data:`NONLINEARITIES`, as
    modules (``nn.ReLU()``), functions (``F.relu``, ``torch.tanh``) or tensor methods
    (``x.relu()``); pass ``nonlinearities=(*NONLINEARITIES, MyActivation)`` to add your own.
    Softmax is not one (BN is not put before an output softmax), and nothing may sit in between:
    ``conv → pool → relu`` gets no BN. A layer whose output is also used elsewhere (a residual
    branch) gets none either, since dropping its bias would change that other use.

    The inserted layers are :class:`batchnorm.BatchNorm1d/2d/3d` with ``eps`` and ``momentum``
    (``batchnorm.convert(model, to="torch")`` turns them into torch's), the size of the layer's
    output channels, on its device and dtype, and in its train/eval mode. The layer's bias is
    dropped and its value moved nowhere: the mean subtraction of BN cancels any constant added
    before it, and BN's β takes its role (Sec. 3.2). Linear layers are assumed to output
    ``(N, features)``: BN normalizes dimension 1.

    Where the BN goes: in an ``nn.Sequential`` it is inserted right after the layer (later
    children move up one index; named children keep their names and the BN is called
    ``<name>_bn``); elsewhere the layer's attribute becomes ``nn.Sequential(layer, bn)``.

    Args:
        model: any module whose forward ``torch.fx`` can trace. A submodule that cannot be traced
            is skipped if it holds none of :data:`LAYERS`; otherwise :class:`ModelTraceError`
            names it.
        skip_last: leave the last ``Linear``/``Conv`` called in forward (the output layer) alone.
        eps, momentum: of the new BN layers (torch's meaning and defaults).
        nonlinearities: module classes, functions and method names that count as g.

    Returns:
        A new model; ``model`` is not modified. Layers called more than once in forward, or
        registered under two names, get no BN (with a warning): one BN cannot follow each use.
    """
    check_initialized(model, "add_batchnorm")
    new = copy.deepcopy(model)
    module_classes = tuple(g for g in nonlinearities if isinstance(g, type))
    leaf_types = (*LAYERS, *module_classes, nn.modules.batchnorm._BatchNorm)

    def has_no_layers(m: nn.Module) -> bool:
        return not any(type(sub) in LAYERS for sub in m.modules())

    graph, _ = trace_skipping(new, leaf_types, has_no_layers, tool="add_batchnorm", advice=_ADVICE)
    layer_nodes = [
        n
        for n in graph.nodes
        if n.op == "call_module" and type(new.get_submodule(n.target)) in LAYERS
    ]
    if skip_last:
        layer_nodes = layer_nodes[:-1]
    counts, paths = call_counts(new, graph), module_paths(new)
    chosen: list[str] = []
    warned: set[int] = set()
    for node in layer_nodes:
        layer = new.get_submodule(node.target)
        if not _feeds_nonlinearity(node, new, nonlinearities) or id(layer) in warned:
            continue
        if counts[id(layer)] > 1 or len(paths[id(layer)]) > 1:
            warned.add(id(layer))
            warnings.warn(
                f"add_batchnorm: layer '{node.target}' ({type(layer).__name__}) is called "
                f"{counts[id(layer)]} times in forward and registered as "
                f"{', '.join(repr(p) for p in paths[id(layer)])}; it gets no BN (one BN layer "
                "cannot follow each use). Give each use its own layer to normalize it.",
                UserWarning,
                stacklevel=2,
            )
            continue
        chosen.append(node.target)
    if not chosen:
        warnings.warn(
            "add_batchnorm: no Linear/Conv layer feeds a nonlinearity directly; nothing was "
            "inserted (see add_batchnorm's docstring for what counts)",
            UserWarning,
            stacklevel=2,
        )
    # Resolve every (parent, layer) pair first: an insertion renumbers the parent's later children.
    targets = []
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name)
        targets.append((parent, parent._modules[child]))
    for parent, layer in targets:
        _insert(parent, layer, _make_bn(layer, eps, momentum))
    return name_layers(new)


def _make_bn(layer: nn.Module, eps: float, momentum: float | None) -> nn.Module:
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = LAYERS[type(layer)](
        channels, eps=eps, momentum=momentum, device=layer.weight.device, dtype=layer.weight.dtype
    )
    return bn.train(layer.training)


def _insert(parent: nn.Module, layer: nn.Module, bn: nn.Module) -> None:
    """Put ``bn`` right after ``layer``, a child of ``parent``, and drop the layer's bias."""
    # Sec. 3.2: the bias is redundant before BN (its value is moved nowhere; β replaces it).
    layer.register_parameter("bias", None)
    items = list(parent._modules.items())
    child = next(key for key, m in items if m is layer)
    if type(parent) is not nn.Sequential:
        parent._modules[child] = nn.Sequential(layer, bn)
        return
    numbered = all(key == str(i) for i, (key, _) in enumerate(items))
    parent._modules.clear()
    for key, module in items:
        parent._modules[str(len(parent._modules)) if numbered else key] = module
        if module is layer:
            parent._modules[str(len(parent._modules)) if numbered else f"{key}_bn"] = bn
