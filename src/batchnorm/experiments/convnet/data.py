"""The images of the convnet study: standardized per channel, augmented per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import data
from ..common import holdout
from .recipe import Recipe

__all__ = ["ConvnetData", "make_batch", "prepare_data"]


@dataclass(frozen=True)
class ConvnetData:
    """A data set ready for training: uint8 training images (augmented per batch), standardized
    float32 validation and test images (channels-last), and the per-channel mean and std used
    for all of them (of the training images, the validation ones set aside)."""

    name: str
    x_train: Tensor  # uint8 (N, C, H, W)
    y_train: Tensor  # int64 (N,)
    x_val: Tensor  # float32 (V, C, H, W), standardized, channels-last (V = 0: no validation)
    y_val: Tensor
    x_test: Tensor  # float32 (N, C, H, W), standardized, channels-last
    y_test: Tensor
    mean: Tensor  # (1, C, 1, 1), of the training pixels scaled to [0, 1]
    std: Tensor
    classes: int
    source: str

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def prepare_data(dataset: data.Dataset, validation: int = 0) -> ConvnetData:
    """The last ``validation`` training images set aside; per-channel mean and std of the rest;
    the validation and test images standardized once."""
    (x, y), (xv, yv) = holdout(dataset.train.images, dataset.train.labels, validation)
    scaled = x.double().div(255)
    mean = scaled.mean(dim=(0, 2, 3), keepdim=True).float()
    std = scaled.std(dim=(0, 2, 3), keepdim=True).float()

    def standardized(images: Tensor) -> Tensor:
        z = (images.float().div(255) - mean) / std
        return z.contiguous(memory_format=torch.channels_last)

    return ConvnetData(
        dataset.name,
        x.contiguous(),
        y.contiguous(),
        standardized(xv),
        yv.contiguous(),
        standardized(dataset.test.images),
        dataset.test.labels.contiguous(),
        mean,
        std,
        len(dataset.classes),
        str(dataset.source),
    )


def make_batch(d: ConvnetData, idx: Tensor, recipe: Recipe, gen: torch.Generator | None) -> Tensor:
    """The training images ``idx``, distorted as ``recipe`` says, standardized, channels-last.

    Distortions, with the random draws from ``gen`` (``None``: no distortion at all):

    - geometric: each image moved by a random (dy, dx) in ``[−translate, translate]²`` pixels,
      filled with black (zero) where it moves away from the border;
    - photometric, strength p = ``recipe.photometric``, on the [0, 1] pixel scale: contrast
      ``c ~ U(1 − p, 1 + p)`` about the image's own mean, then brightness ``b ~ U(−p/2, p/2)``
      added, then clipped to [0, 1].
    """
    x = d.x_train.index_select(0, idx).float().div_(255)
    if gen is not None and recipe.translate:
        t = recipe.translate
        padded = F.pad(x, (t, t, t, t))
        offsets = torch.randint(0, 2 * t + 1, (len(x), 2), generator=gen).tolist()
        h, w = x.shape[-2:]
        x = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
        )
    if gen is not None and recipe.photometric:
        p = recipe.photometric
        c = 1 + p * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
        b = p / 2 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * c + m + b).clamp_(0, 1)
    return ((x - d.mean) / d.std).contiguous(memory_format=torch.channels_last)
