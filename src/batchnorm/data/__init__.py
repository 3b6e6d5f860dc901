"""Data sets for the paper's experiments: MNIST and Fashion-MNIST from their canonical IDX files.

>>> from batchnorm import data
>>> ds = data.load("mnist")              # or data.load("fashion-mnist", data_dir="...")
>>> ds.train.images.shape, ds.train.images.dtype, ds.test.labels.shape
(torch.Size([60000, 1, 28, 28]), torch.uint8, torch.Size([10000]))

Images come as uint8 ``(N, C, H, W)`` tensors (C = 1 here; CIFAR-10's ``(N, 3, 32, 32)`` will fit the
same :class:`Dataset`), labels as int64. Where the files are looked for, how they are verified and
downloaded: :mod:`batchnorm.data.store` and :mod:`batchnorm.data.sources`. Every failure raises a
:class:`DataError` that names the file and says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .idx import IdxError, parse_idx
from .sources import DATASETS, FASHION_MNIST, MNIST, DatasetSpec, FileSpec
from .store import (
    ENV_VAR,
    ChecksumError,
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    cache_dir,
    fetch,
    locate,
    read_verified,
)

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "FASHION_MNIST",
    "MNIST",
    "ChecksumError",
    "CorruptFileError",
    "DataError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "FileSpec",
    "Split",
    "cache_dir",
    "fetch",
    "load",
    "locate",
]


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    source: Path  # the folder the files were read from


def load(
    dataset: str | DatasetSpec = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
) -> Dataset:
    """Load a data set by name (``"mnist"``, ``"fashion-mnist"``) or :class:`DatasetSpec`.

    Searches ``data_dir``, else ``$BATCHNORM_DATA``, OS package folders and the per-user cache, else
    downloads into the cache (if ``download``); see :func:`locate`. Every file's content md5 is
    checked, and so are the IDX headers, the image/label counts and the label range.
    """
    spec = _spec(dataset)
    folder = locate(spec, data_dir, download=download)
    if spec.format != "idx":
        raise ValueError(f"{spec.name}: unknown data set format {spec.format!r}")
    arrays = {}
    for role, f in spec.files.items():
        path = next(folder / n for n in f.names if (folder / n).is_file())
        content = read_verified(path, f)
        try:
            arrays[role] = (path, parse_idx(content, str(path)))
        except IdxError as exc:  # only reachable if a content md5 in the spec is wrong
            raise CorruptFileError(str(exc)) from exc
    return Dataset(
        name=spec.name,
        classes=spec.classes,
        train=_split(spec, arrays["train_images"], arrays["train_labels"]),
        test=_split(spec, arrays["test_images"], arrays["test_labels"]),
        source=folder,
    )


def _spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def _split(
    spec: DatasetSpec, images: tuple[Path, np.ndarray], labels: tuple[Path, np.ndarray]
) -> Split:
    (ipath, x), (lpath, y) = images, labels
    if x.ndim != 3 or x.dtype != np.uint8:
        raise CorruptFileError(f"{ipath}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise CorruptFileError(f"{lpath}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise CorruptFileError(
            f"{ipath} holds {len(x)} images but {lpath} holds {len(y)} labels; they must match"
        )
    if len(y) and int(y.max()) >= len(spec.classes):
        raise CorruptFileError(
            f"{lpath}: label {int(y.max())} is out of range for {len(spec.classes)} classes"
        )
    return Split(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
