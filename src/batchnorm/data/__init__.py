"""Data sets for the paper's experiments: MNIST and Fashion-MNIST from their canonical IDX files,
CIFAR-10 from its python pickles.

>>> from batchnorm import data
>>> ds = data.load("mnist")              # or data.load("fashion-mnist", data_dir="...")
>>> ds.train.images.shape, ds.train.images.dtype, ds.test.labels.shape
(torch.Size([60000, 1, 28, 28]), torch.uint8, torch.Size([10000]))

Images come as uint8 ``(N, C, H, W)`` tensors (C = 1 for MNIST and Fashion-MNIST; ``data.load
("cifar10")`` gives ``(50000, 3, 32, 32)`` and ``(10000, 3, 32, 32)``), labels as int64. Where the files are looked for, how they are verified and
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

from .cifar import CifarError, parse_batch, parse_meta
from .idx import IdxError, parse_idx
from .sources import CIFAR10, DATASETS, FASHION_MNIST, MNIST, ArchiveSpec, DatasetSpec, FileSpec
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
    "CIFAR10",
    "DATASETS",
    "ENV_VAR",
    "FASHION_MNIST",
    "MNIST",
    "ArchiveSpec",
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
    """Load a data set by name (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``) or :class:`DatasetSpec`.

    Searches ``data_dir``, else ``$BATCHNORM_DATA``, OS package folders and the per-user cache, else
    downloads into the cache (if ``download``); see :func:`locate`. Every file's content md5 is
    checked, and so is each file's structure (IDX headers; CIFAR-10's pickled arrays), the
    image/label counts and the label range.
    """
    spec = _spec(dataset)
    if spec.format not in ("idx", "cifar"):
        raise ValueError(f"{spec.name}: unknown data set format {spec.format!r}")
    folder = locate(spec, data_dir, download=download)
    contents = {}
    for role, f in spec.files.items():
        path = next(folder / n for n in f.names if (folder / n).is_file())
        contents[role] = (path, read_verified(path, f))
    read = _idx_splits if spec.format == "idx" else _cifar_splits
    try:
        train, test = read(spec, contents)
    except (IdxError, CifarError) as exc:  # only reachable if a content md5 in the spec is wrong
        raise CorruptFileError(str(exc)) from exc
    return Dataset(name=spec.name, classes=spec.classes, train=train, test=test, source=folder)


def _idx_splits(spec: DatasetSpec, contents: dict[str, tuple[Path, bytes]]) -> tuple[Split, Split]:
    arrays = {
        role: (path, parse_idx(content, str(path))) for role, (path, content) in contents.items()
    }
    return (
        _split(spec, arrays["train_images"], arrays["train_labels"]),
        _split(spec, arrays["test_images"], arrays["test_labels"]),
    )


def _cifar_splits(
    spec: DatasetSpec, contents: dict[str, tuple[Path, bytes]]
) -> tuple[Split, Split]:
    path, content = contents["batches.meta"]
    names = parse_meta(content, str(path))
    if names != spec.classes:
        raise CifarError(f"{path} names the classes {names}, expected {spec.classes}")
    batches = {
        role: (p, parse_batch(c, str(p)))
        for role, (p, c) in contents.items()
        if role != "batches.meta"
    }
    train = [batches[role] for role in sorted(batches) if role.startswith("data_batch_")]
    test = batches["test_batch"]

    def split(parts: list[tuple[Path, tuple[np.ndarray, np.ndarray]]]) -> Split:
        for p, (_, y) in parts:
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(spec.classes)):
                raise CifarError(f"{p}: a label is out of range for {len(spec.classes)} classes")
        x = np.concatenate([x for _, (x, _) in parts])
        y = np.concatenate([y for _, (_, y) in parts])
        return Split(torch.from_numpy(x), torch.from_numpy(y))

    return split(train), split([test])


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
    """One IDX split, checked: uint8 images (N, H, W), as many labels, every label a class."""
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
