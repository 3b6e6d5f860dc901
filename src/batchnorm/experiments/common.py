"""Pieces the studies share: the validation split, accuracy on a split, Alg. 2's population copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tools import convert_from_sync, recalibrate

__all__ = ["accuracy_and_loss", "holdout", "population_copy"]


def holdout(x: Tensor, y: Tensor, n: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(train, validation)``: the last ``n`` examples of a training split are set aside (the
    same ones for every seed and network), the rest is trained on. Every choice of a study
    (learning rate, decay, initialization, the target of "steps to reach") is made on the
    validation examples; the test set is read only for the numbers reported."""
    if not 0 <= n < len(y):
        raise ValueError(f"validation = {n} must be in 0..{len(y) - 1}")
    cut = len(y) - n
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def accuracy_and_loss(
    model: nn.Module, x: Tensor, y: Tensor, chunk: int = 0
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``, without gradients, in chunks
    of ``chunk`` examples (0: all at once)."""
    if chunk <= 0 or len(y) <= chunk:
        with torch.no_grad():
            logits = model(x)
            acc = (logits.argmax(1) == y).double().mean().item()
            return acc, F.cross_entropy(logits, y).item()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True):
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


def population_copy(model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN layers hold the population statistics of Alg. 2.

    :func:`batchnorm.tools.recalibrate` with the paper's estimator runs ``batches`` through the copy
    without gradients, its BN layers in training mode (each normalizes with batch statistics, so
    it sees what the layers below produce during training, as in the paper's N_BN^tr; Dropout
    and the other layers stay in eval mode) and sets E[x] = E_B[μ_B] and Var[x] =
    m/(m−1)·E_B[σ²_B] (Alg. 2 lines 9–10). The original model is untouched. The pass runs in
    this process alone (SyncBatchNorm layers become plain ones in the copy): in a data-parallel
    run, rank 0 evaluates.
    """
    pop = convert_from_sync(model)
    recalibrate(pop, batches, "paper", sync=False)
    return pop.eval()
