"""What each data set is: its files, the checksums that identify them, and where to download them.

What is verified, and why: every file is identified by the md5 of its *decompressed* content,
checked on every load (about 0.1 s for MNIST). Checking content instead of the ``.gz`` bytes accepts
any faithful copy — the original gzip files, recompressed ones (Debian's ``dataset-fashion-mnist``
package recompressed Fashion-MNIST, so its ``.gz`` md5s differ from upstream's) and uncompressed
IDX files — and refuses everything else. The content md5s below are those of the canonical files:
for MNIST the original ``.gz`` files (whose own md5s match the values every loader lists), for
Fashion-MNIST the decompressed upstream files (the same values are published alongside upstream's
``.gz`` md5s). Beyond the md5, loading checks the IDX header, that image and label counts agree and
that every label names a class.

A new data set format (e.g. CIFAR-10's python pickles, for the convnet study) adds a spec with its
own ``format`` and a reader in :mod:`batchnorm.data`; locating, verifying and downloading files are
shared.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "FASHION_MNIST", "MNIST", "DatasetSpec", "FileSpec"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a data set: its canonical (compressed) name and the md5 of its content."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"; an uncompressed copy drops the ".gz"
    content_md5: str  # md5 of the decompressed bytes

    @property
    def names(self) -> tuple[str, ...]:
        """Names a copy may have on disk, in order of preference."""
        if self.name.endswith(".gz"):
            return (self.name, self.name[: -len(".gz")])
        return (self.name,)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: ``files`` maps a role (``train_images`` …) to a :class:`FileSpec`."""

    name: str  # also the folder name under a data root and in the cache
    files: dict[str, FileSpec]
    classes: tuple[str, ...]
    mirrors: tuple[str, ...] = ()  # base URLs; a file's URL is base + name
    system_dirs: tuple[str, ...] = ()  # where OS packages install a copy
    format: str = "idx"


_IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(*md5s: str) -> dict[str, FileSpec]:
    return {
        role: FileSpec(name, md5)
        for role, name, md5 in zip(_IDX_ROLES, _IDX_NAMES, md5s, strict=True)
    }


MNIST = DatasetSpec(
    name="mnist",
    files=_idx_files(
        "6bbc9ace898e44ae57da46a324031adb",
        "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea",
        "27ae3e4e09519cfbb04c329615203637",
    ),
    classes=tuple(str(d) for d in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files=_idx_files(
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
