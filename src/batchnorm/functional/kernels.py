"""Building and loading the fused CPU kernels (``csrc/batchnorm_cpu.cpp``).

Why a C++ extension compiled on first use (and not numba, nor a build step at install):

- The small-input case is dominated by per-call overhead. The op and its autograd are registered
  in C++ (``torch.library`` and a C++ autograd node), so a training step pays one
  dispatcher call per layer and no Python on the backward path. numba kernels would still need a
  Python ``autograd.Function`` around them.
- Compiling on first use against the torch that is actually installed avoids an ABI mismatch, and
  ``pip install`` stays a plain pure-Python install (no ``--no-build-isolation``). What a user needs
  is a C++ compiler (g++/clang) and ``ninja`` (a pip dependency). The build takes about a minute,
  once; the result is cached by a key over the source, the flags, the torch version and the CPU.

Where the kernels cannot be built or loaded, the library falls back to the portable PyTorch path
(:class:`~batchnorm.functional.autograd.BatchNormFunction`) with a one-time warning.

Environment variables:

- ``BATCHNORM_KERNELS``: ``auto`` (default: build if needed, fall back with a warning),
  ``require`` (raise if the kernels are unavailable; CI sets this), ``off`` (never load them).
- ``BATCHNORM_CACHE``: the cache root (default ``$XDG_CACHE_HOME/batchnorm`` or
  ``~/.cache/batchnorm``); kernels live in ``<root>/kernels/<key>/``.
- ``BATCHNORM_CPU_ARCH``: the ``-march`` value (default ``native``; set e.g. ``x86-64-v3`` to
  build kernels that run on other machines sharing the cache).
- ``BATCHNORM_STREAM_BYTES``: float32 and 16-bit outputs (y, dx) of at least this many bytes are
  written with streaming stores (default 8 MiB; ``-1``: never); see :func:`set_stream_bytes`.
- ``BATCHNORM_STREAM_MAX_BYTES``: ... unless they are this large or larger (default 32 MiB;
  ``-1``: no limit); see :func:`set_stream_max_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from .._cache import cache_root

try:
    import fcntl
except ImportError:  # not POSIX: the kernels' build (g++/clang) is not supported there anyway
    fcntl = None

__all__ = [
    "KernelsUnavailableWarning",
    "available",
    "build_dir",
    "load",
    "loaded",
    "module",
    "needs_build",
    "set_stream_bytes",
    "set_stream_max_bytes",
    "status",
]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "batchnorm_cpu.cpp"
_ABI_VERSION = 6
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "reason": "", "module": None}


class KernelsUnavailableWarning(UserWarning):
    """The fused CPU kernels could not be loaded; the slower portable path is used instead."""


def _flags() -> list[str]:
    arch = os.environ.get("BATCHNORM_CPU_ARCH", "native")
    # -fno-math-errno lets sqrt vectorize (the kernels never rely on errno); the C++ standard
    # is torch's choice
    return ["-O3", f"-march={arch}", "-fno-math-errno", "-fopenmp"]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _key() -> str:
    h = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        " ".join(_flags()).encode(),
        torch.__version__.encode(),
        platform.python_version().encode(),
        platform.machine().encode(),
        _cpu_signature().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` for one build, released by the OS if the process dies."""
    if fcntl is None:
        yield
        return
    with open(folder / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_load() -> ModuleType:
    key = _key()
    where = build_dir()
    name = f"batchnorm_cpu_{key}"
    library = where / f"{name}.so"
    done = where / "BUILT"
    if done.exists() and library.exists():
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from torch.utils import cpp_extension

        where.mkdir(parents=True, exist_ok=True)
        with _build_lock(where):  # processes starting together build once
            # cpp_extension's own lock is a file that a killed build leaves behind, after which
            # every later build waits on it forever. Holding our lock (which the OS releases when
            # its process dies), any such file is stale.
            (where / "lock").unlink(missing_ok=True)
            module = cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=_flags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(where),
                verbose=os.environ.get("BATCHNORM_VERBOSE_BUILD") == "1",
            )
            done.write_text(f"{name}.so\n")
    if torch.ops.batchnorm.abi_version() != _ABI_VERSION:
        raise RuntimeError("the loaded kernel library has an unexpected ABI version")
    return module


def load() -> bool:
    """Load (building if needed) the fused kernels; True if they are usable. Thread-safe, cached."""
    if _state["loaded"] is not None:  # the common case, and all torch.compile has to trace
        return bool(_state["loaded"])
    if torch.compiler.is_compiling():
        # Loading (maybe building) cannot be traced: a graph traced before the first eager call
        # uses the portable path (a graph break here would fail torch.compile(fullgraph=True)).
        return False
    return _load_once()


@torch.compiler.disable
def _load_once() -> bool:
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        mode = os.environ.get("BATCHNORM_KERNELS", "").strip().lower() or "auto"  # empty: unset
        if mode not in ("auto", "require", "off"):
            raise ValueError(f"BATCHNORM_KERNELS must be auto, require or off, got {mode!r}")
        if mode == "off":
            _state.update(loaded=False, reason="disabled by BATCHNORM_KERNELS=off")
            return False
        try:
            module = _build_and_load()
        except Exception as exc:  # any build or load failure means: use the portable path
            _state.update(loaded=False, reason=f"{type(exc).__name__}: {exc}")
            if mode == "require":
                raise RuntimeError(
                    "BATCHNORM_KERNELS=require but the fused CPU kernels could not be built or "
                    f"loaded: {_state['reason']}"
                ) from exc
            warnings.warn(
                "batchnorm: the fused CPU kernels are unavailable "
                f"({_state['reason'].splitlines()[0][:300]}); using the portable PyTorch path, "
                "which is correct but slower. Install a C++ compiler (g++ or clang) and ninja, "
                "or set BATCHNORM_KERNELS=off to silence this warning.",
                KernelsUnavailableWarning,
                stacklevel=3,
            )
            return False
        _register_fake_kernels()
        _state.update(loaded=True, reason="", module=module)
        return True


def _register_fake_kernels() -> None:
    """Shape functions of the ops, so that torch.compile / torch.export can trace them."""

    def stats(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[1],), dtype=torch.float64)

    def like_x(x: torch.Tensor) -> torch.Tensor:
        # As the kernels lay out y and dx: x's own strides when x is contiguous or channels_last
        # (3d), else contiguous (they read any other input through a contiguous copy).
        if (
            x.is_contiguous()
            or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
        ):
            return torch.empty_like(x)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("batchnorm::train_forward")
    def _(x, weight, bias, running_mean, running_var, nbt, nonfinite, momentum, eps, guard):
        return like_x(x), stats(x), stats(x)

    @torch.library.register_fake("batchnorm::train_backward")
    def _(grad_out, x, mean, var, weight, eps, mask):
        param = weight if weight is not None else x
        return (
            like_x(x) if mask[0] else None,
            param.new_empty((x.shape[1],)) if mask[1] else None,
            param.new_empty((x.shape[1],)) if mask[2] else None,
        )

    @torch.library.register_fake("batchnorm::moments")
    def _(x):
        return stats(x), stats(x)

    @torch.library.register_fake("batchnorm::normalize")
    def _(x, mean, var, weight, bias, eps):
        return like_x(x)

    @torch.library.register_fake("batchnorm::backward_reduce")
    def _(grad_out, x, mean):
        return stats(x), stats(x)

    @torch.library.register_fake("batchnorm::backward_elementwise")
    def _(grad_out, x, mean, var, weight, sum_g, sum_gc, count, eps):
        return like_x(x)


def build_dir() -> Path:
    """Where the kernels for this source, compiler flags, torch and CPU are (or will be) cached."""
    return cache_root() / "kernels" / _key()


def needs_build() -> bool:
    """Whether the next :func:`load` will compile the kernels (about a minute), not just load
    them: they are not loaded, not disabled, and not yet built into :func:`build_dir`."""
    if _state["loaded"] is not None:
        return False
    mode = os.environ.get("BATCHNORM_KERNELS", "").strip().lower() or "auto"
    return mode != "off" and not (build_dir() / "BUILT").exists()


def loaded() -> bool:
    """True once the kernels are loaded (never builds; cheap enough for every call)."""
    return _state["loaded"] is True


def module() -> ModuleType:
    """The loaded extension module (its ``train_forward`` is the eager entry point)."""
    if not load():
        raise RuntimeError(status())
    return _state["module"]


def available() -> bool:
    """Whether the fused CPU kernels are loaded (building them on first call)."""
    return load()


def status() -> str:
    """One line on the kernels: where they live, or why they are not used."""
    if load():
        return f"fused CPU kernels loaded from {build_dir()}"
    if _state["loaded"] is None:  # asked while torch.compile traces, before any eager call
        return "fused CPU kernels not loaded yet (torch.compile cannot load them while tracing)"
    return f"fused CPU kernels unavailable: {_state['reason']}"


def set_stream_bytes(nbytes: int | None) -> int | None:
    """Write float32 and 16-bit outputs of at least ``nbytes`` bytes with streaming stores;
    ``None``: never.

    A streaming (non-temporal) store writes a cache line to memory without first reading it and
    without keeping it in cache: for outputs too large to stay in cache, writing y or dx then
    costs one memory transfer per line instead of two. For outputs the next op would still find
    in cache it costs more, hence the threshold: 8 MiB by default (``BATCHNORM_STREAM_BYTES``),
    chosen by measurement on the project's machine (``benchmarks/README.md``). Results are the
    same either way, bit for bit. Returns the previous setting.
    """
    return _exchange_bytes("set_stream_bytes", nbytes)


def set_stream_max_bytes(nbytes: int | None) -> int | None:
    """Write outputs of ``nbytes`` bytes or more with ordinary stores again, however large
    (``None``: no upper limit). Returns the previous setting.

    glibc's malloc (what a PyTorch process allocates with) gives every allocation above its
    mmap threshold, which grows to at most 32 MiB, a fresh mapping, so the kernel faults in and
    zeroes each page of such an output as it is first written; streaming stores into those pages
    measured 1.3–1.5× slower than ordinary ones, against 1.2–1.6× faster into reused pages
    (``benchmarks/bm_layers.py --stream-bytes``, ``benchmarks/README.md``). Hence the default
    of 32 MiB (``BATCHNORM_STREAM_MAX_BYTES``). A program whose large allocations reuse their
    pages (``MALLOC_MMAP_MAX_=0``, jemalloc, tcmalloc) can lift it with ``None``. Results are the
    same either way, bit for bit.
    """
    return _exchange_bytes("set_stream_max_bytes", nbytes)


def _exchange_bytes(op: str, nbytes: int | None) -> int | None:
    """Set one of the kernels' byte counts (None: -1 to the op) and return the previous one."""
    if not load():
        raise RuntimeError(status())
    old = getattr(torch.ops.batchnorm, op)(-1 if nbytes is None else int(nbytes))
    return None if old < 0 else old
