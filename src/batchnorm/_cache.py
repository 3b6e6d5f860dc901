"""The per-user cache shared by the fused kernels and the data sets."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """Root of the per-user cache shared by kernels and data sets."""
    env = os.environ.get("BATCHNORM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "batchnorm"
