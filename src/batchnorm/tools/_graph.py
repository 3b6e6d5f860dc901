"""torch.fx tracing for the tools that need to know which layer feeds which (add_batchnorm, fold).

The traced graph is used for *analysis only*: the tools then edit the model's own modules, so the
result keeps the user's classes, methods and TorchScript-ability instead of becoming a
``GraphModule``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

__all__ = ["ModelTraceError", "trace", "trace_skipping"]


class ModelTraceError(RuntimeError):
    """A model, or one of its submodules, cannot be traced with ``torch.fx``.

    ``module_name`` is the qualified name of the innermost module whose ``forward`` failed (``""``
    for the model itself) and ``module`` that module.
    """

    def __init__(self, tool: str, name: str, module: nn.Module, cause: BaseException, advice: str):
        self.module_name = name
        self.module = module
        what = f"submodule '{name}' ({type(module).__name__})" if name else "the model"
        what_model = "it" if not name else "its forward"
        super().__init__(
            f"{tool}: cannot trace {what} with torch.fx: {type(cause).__name__}: {cause}. "
            f"torch.fx runs forward() on symbolic values, so {what_model} cannot branch or loop "
            f"on tensor values, call len() on them, or convert them to Python numbers. {advice}"
        )


class _Tracer(fx.Tracer):
    """Treats ``leaf_types`` and the given module objects as leaves and remembers which module's
    forward raised, innermost first."""

    def __init__(self, leaf_types: tuple[type, ...], leaves: set[int]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaves = leaves
        self.failed: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or id(m) in self.leaves
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = (name, m)
            raise


def trace(
    model: nn.Module,
    leaf_types: tuple[type, ...],
    *,
    tool: str,
    advice: str,
    leaves: set[int] | None = None,
) -> fx.Graph:
    """The fx graph of ``model``'s forward, with ``leaf_types`` (and the module objects whose ids are
    in ``leaves``) kept as ``call_module`` nodes; raises :class:`ModelTraceError` naming the
    innermost module that could not be traced."""
    tracer = _Tracer(leaf_types, leaves or set())
    try:
        return tracer.trace(model)
    except Exception as e:
        name, module = tracer.failed or ("", model)
        raise ModelTraceError(tool, name, module, e, advice) from e


def trace_skipping(
    model: nn.Module,
    leaf_types: tuple[type, ...],
    can_skip: Callable[[nn.Module], bool],
    *,
    tool: str,
    advice: str,
) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """Like :func:`trace`, but a submodule that cannot be traced and for which ``can_skip`` is true
    becomes a leaf (an opaque ``call_module`` node) and tracing starts again. Returns the graph and
    the skipped submodules by qualified name. Raises for the model itself or a module that cannot
    be skipped."""
    skipped: dict[str, nn.Module] = {}
    while True:
        try:
            ids = {id(m) for m in skipped.values()}
            return trace(model, leaf_types, tool=tool, advice=advice, leaves=ids), skipped
        except ModelTraceError as e:
            if e.module is model or not can_skip(e.module):
                raise
            skipped[e.module_name] = e.module


def call_counts(model: nn.Module, graph: fx.Graph) -> dict[int, int]:
    """How many times the graph calls each module, by module id."""
    counts: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(model.get_submodule(node.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of each module (a module registered twice has two), by module id."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths
