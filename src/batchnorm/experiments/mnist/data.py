"""The binarized data set of Figure 1, flattened, with its validation split."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ... import data
from ..common import holdout

__all__ = ["MnistData", "prepare_data"]


@dataclass(frozen=True)
class MnistData:
    """float32 ``(N, 784)`` inputs in {0, 1} and int64 labels: training, validation, test."""

    name: str
    threshold: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str


def prepare_data(dataset: data.Dataset, threshold: int = 128, validation: int = 0) -> MnistData:
    """Binarize once (``pixel >= threshold``) into contiguous tensors that batches index directly;
    the last ``validation`` training images become the validation split."""

    def flat(images: Tensor) -> Tensor:
        return (images.reshape(len(images), -1) >= threshold).float().contiguous()

    (x, y), (xv, yv) = holdout(flat(dataset.train.images), dataset.train.labels, validation)
    return MnistData(
        dataset.name,
        threshold,
        x.contiguous(),
        y.contiguous(),
        xv.contiguous(),
        yv.contiguous(),
        flat(dataset.test.images),
        dataset.test.labels.contiguous(),
        str(dataset.source),
    )
