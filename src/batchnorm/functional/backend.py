"""Which implementation runs a training-mode BN call.

- ``"fused"``: the fused C++ CPU kernels (:mod:`batchnorm.functional.kernels`), the default on CPU;
- ``"python"``: plain torch ops with the paper's analytic backward
  (:class:`~batchnorm.functional.autograd.BatchNormFunction`), used on CPU when the kernels cannot
  be built;
- ``"native"``: PyTorch's own ``F.batch_norm``, used on every other device (CUDA gets cuDNN) and
  for tensor subclasses (DTensor and other ``__torch_dispatch__`` wrappers) on any device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from . import kernels

__all__ = ["BACKENDS", "current_backend", "fused_eager", "select_backend", "use_backend"]

BACKENDS = ("auto", "fused", "python", "native")
_override: list[str] = []
_ENV_BACKEND = os.environ.get("BATCHNORM_BACKEND", "auto")
if _ENV_BACKEND not in BACKENDS:
    raise ValueError(f"BATCHNORM_BACKEND must be one of {BACKENDS}, got {_ENV_BACKEND!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests, benchmarks, debugging)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown batchnorm backend {name!r}; choose one of {BACKENDS}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def current_backend() -> str:
    """The requested backend: the innermost :func:`use_backend`, else ``$BATCHNORM_BACKEND`` (read
    at import), else ``"auto"``."""
    return _override[-1] if _override else _ENV_BACKEND


def fused_eager(x: Tensor) -> bool:
    """True in the common case: no backend requested, a plain CPU tensor, the kernels loaded, not under
    ``torch.compile`` or ``torch.func.vmap``; then a training call goes straight to the kernels'
    eager entry point. (It runs on every training step, so it only reads flags.)"""
    return (
        not _override
        and _ENV_BACKEND == "auto"
        and type(x) is Tensor
        and x.is_cpu
        and kernels.loaded()
        and not torch.compiler.is_compiling()
        and (peek_interpreter_stack() is None or not _under_vmap())
    )


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active. The kernels have no batching rule; the portable
    path's plain torch ops do (``grad``, ``jvp``, ``vjp`` work through the kernels)."""
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def select_backend(x: Tensor) -> str:
    """The backend that will run a training-mode call on ``x``."""
    if fused_eager(x):
        return "fused"  # the common case, checked first: this runs on every training step
    requested = current_backend()
    if type(x) not in (Tensor, torch.nn.Parameter):
        # A tensor subclass (DTensor, a __torch_dispatch__ wrapper): only torch's own ops go
        # through its dispatch, whatever was requested.
        return "native"
    if not x.is_cpu:
        # DEVIATION from "fused everywhere": there is no GPU here to test GPU kernels on, so CUDA
        # and other devices get PyTorch's own (cuDNN) kernels, whatever was requested.
        return "native"
    if requested == "auto":
        # (torch.compile traces the registered op and must not trace functorch's internals)
        compiling = torch.compiler.is_compiling()
        vmap = not compiling and _under_vmap()
        if kernels.load() and not vmap:
            return "fused"
        # torch.compile cannot trace the portable path's autograd.Function (it defines a jvp):
        # compiled without the kernels (not loaded yet, or unavailable), a call takes torch's
        # own batch norm, with our semantics (the native backend)
        return "native" if compiling else "python"
    if requested == "fused" and not kernels.load():
        raise RuntimeError(f"the fused backend was requested but {kernels.status()}")
    return requested
