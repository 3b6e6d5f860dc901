"""Reading the IDX format of MNIST and Fashion-MNIST (LeCun et al.), with errors that say what is wrong.

An IDX file is a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the values in C order (big-endian for multi-byte types). MNIST's images are
``ubyte`` with dims ``(N, 28, 28)`` (magic 2051), its labels ``ubyte`` with dims ``(N,)`` (2049).
Files may be gzip-compressed (the usual ``*.gz``) or not.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IdxError", "parse_idx", "read_bytes"]

# IDX type byte -> numpy dtype (big-endian where it matters)
_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
    """A file is not a complete, well-formed IDX file (or gzip stream of one)."""


def read_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (gzip if it starts with gzip's magic, else raw).

    Raises :class:`IdxError` naming the file for a truncated or corrupted gzip stream.
    """
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except EOFError as exc:
        raise IdxError(
            f"{path} is truncated: its gzip stream ends early ({len(data):,} bytes on disk)"
        ) from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise IdxError(f"{path} is corrupted: it cannot be decompressed ({exc})") from exc


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse decompressed IDX bytes into an array of the file's dtype and shape (a writable copy).

    Checks the magic, the type byte and that the payload is exactly as long as the header says, so
    a truncated or padded file is refused instead of being misread.
    """
    if len(data) < 4:
        raise IdxError(f"{where} is truncated: {len(data)} bytes, not even an IDX header")
    zero, type_code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in _TYPES or ndim == 0:
        raise IdxError(
            f"{where} is not an IDX file: its magic is {data[:4].hex()} (expected 0000 08 01 for "
            "labels or 0000 08 03 for images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{where} is truncated inside its header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _TYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxError(
            f"{where} is {problem}: {len(data):,} bytes, but its header (dims {dims}) needs "
            f"{expected:,}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)
