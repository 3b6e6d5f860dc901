"""Reading CIFAR-10's "python version" (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Each batch file is a Python 2 pickle of a dict with ``data``, a uint8 numpy array of shape
``(N, 3072)`` whose rows hold one 32×32 image as 1,024 red, then 1,024 green, then 1,024 blue
values in row-major order (so a row reshapes to ``(3, 32, 32)``), and ``labels``, a list of N ints
in 0..9. ``batches.meta`` holds ``label_names``.

Unpickling runs code named by the file, so these files are read with an unpickler that resolves
only what such a batch needs — numpy's array reconstruction and dtypes, and ``_codecs.encode``
(how Python 3 pickles bytes at protocol 2) — and refuses every other global with
:class:`CifarError`: a file that tries to call anything else is not a CIFAR batch. Python 2
strings are decoded as latin-1 (numpy's documented choice for Python 2 array pickles).
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

try:  # numpy >= 2 renamed numpy.core to numpy._core (and warns on the old name)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = ["CifarError", "parse_batch", "parse_meta"]

_IMAGE_VALUES = 3 * 32 * 32

# The only globals a CIFAR-10 pickle refers to; the original files name numpy.core (numpy 1).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class CifarError(ValueError):
    """A file is not a well-formed CIFAR-10 python batch."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str) -> None:
        super().__init__(file, encoding="latin1")
        self.where = where

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CifarError(
                f"{self.where} is not a CIFAR-10 batch: its pickle refers to {module}.{name}, "
                "which a CIFAR-10 file never does (refused without running it)"
            ) from None


def _unpickle(content: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(content), where).load()
    except CifarError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError, ...
        raise CifarError(
            f"{where} is not a readable pickle ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    if not isinstance(obj, dict):
        raise CifarError(f"{where} holds a {type(obj).__name__}, not a CIFAR-10 dict")
    # Python 2 str keys arrive as str (latin-1); bytes keys (a file written with them) too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_batch(content: bytes, where: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` of one batch file's bytes."""
    d = _unpickle(content, where)
    for key in ("data", "labels"):
        if key not in d:
            raise CifarError(f"{where} has no {key!r} entry (keys: {sorted(map(str, d))})")
    x, labels = d["data"], d["labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2:
        raise CifarError(
            f"{where}: 'data' must be a uint8 array of rows, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if x.shape[1] != _IMAGE_VALUES:
        raise CifarError(
            f"{where}: each row of 'data' must hold {_IMAGE_VALUES} values (3×32×32), got "
            f"{x.shape[1]}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CifarError(f"{where}: 'labels' is not a list of integers ({exc})") from exc
    if y.ndim != 1 or len(y) != len(x):
        raise CifarError(f"{where} holds {len(x)} images but {y.size} labels; they must match")
    return np.ascontiguousarray(x).reshape(-1, 3, 32, 32), y


def parse_meta(content: bytes, where: str = "batches.meta") -> tuple[str, ...]:
    """The class names of ``batches.meta``."""
    d = _unpickle(content, where)
    names = d.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise CifarError(f"{where} has no list of 'label_names'")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)
