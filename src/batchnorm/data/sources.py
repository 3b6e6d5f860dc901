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

CIFAR-10 (the "python version": five pickled training batches, one test batch and a meta file,
uncompressed) is identified the same way, by each file's md5 (the values every loader lists, e.g.
torchvision's). It is distributed as one archive, ``cifar-10-python.tar.gz``, whose own md5 is
checked before its files are extracted (:class:`ArchiveSpec`). Beyond the md5, reading checks the
pickles' structure: uint8 rows of 3,072 values, as many labels as rows, every label a class.

A new data set format adds a spec with its own ``format`` and a reader in :mod:`batchnorm.data`;
locating, verifying and downloading files are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CIFAR10",
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "ArchiveSpec",
    "DatasetSpec",
    "FileSpec",
]


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
class ArchiveSpec:
    """A data set downloaded as one ``.tar.gz``: its files are the members ``folder/<name>``."""

    name: str  # e.g. "cifar-10-python.tar.gz"; its URL is a mirror + name
    md5: str  # md5 of the archive file itself
    folder: str  # the folder inside the archive that holds the files


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: ``files`` maps a role (``train_images`` …) to a :class:`FileSpec`."""

    name: str  # also the folder name under a data root and in the cache
    files: dict[str, FileSpec]
    classes: tuple[str, ...]
    mirrors: tuple[str, ...] = ()  # base URLs; a file's URL is base + name
    system_dirs: tuple[str, ...] = ()  # where OS packages install a copy
    format: str = "idx"  # "idx" (MNIST, Fashion-MNIST) or "cifar" (CIFAR-10's python pickles)
    archive: ArchiveSpec | None = None  # downloaded as one archive instead of file by file
    aliases: tuple[str, ...] = ()  # other names of its folder under a data root


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

CIFAR10 = DatasetSpec(
    name="cifar10",
    files={
        name: FileSpec(name, md5)
        for name, md5 in (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
            ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        )
    },
    classes=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    format="cifar",
    archive=ArchiveSpec(
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"
    ),
    aliases=("cifar-10-batches-py",),  # the folder the archive unpacks to
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10)}
