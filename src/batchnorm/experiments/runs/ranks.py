"""Data-parallel runs under ``torchrun``: this process's place, its slice of each batch, its loss.

Under ``torchrun`` every process trains its slice of each global batch, ``DistributedDataParallel``
averages the gradients, and only rank 0 touches the run folder (lock, config, metrics, checkpoints,
TensorBoard, reports); every rank reads the checkpoint to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...tools import convert_sync
from .errors import RunError

__all__ = ["Ranks"]


class Ranks:
    """This process's place in a data-parallel run under ``torchrun`` (rank 0 of 1 otherwise).

    Started by ``torchrun --nproc-per-node N``, with the process group initialized, every rank
    trains on its contiguous slice of the *same* global batch (:meth:`local`), the models are
    wrapped in ``DistributedDataParallel`` (:meth:`wrap`), and the loss is scaled so that DDP's
    gradient average equals the gradient of the mean loss over the global batch, even when the
    batch does not split evenly (:meth:`loss`). BN statistics are either synchronized over the
    ranks (:class:`~batchnorm.nn.SyncBatchNorm`: each layer normalizes with the statistics of
    the whole global batch, as in a single process) or per rank (each normalizes its own slice;
    DDP broadcasts rank 0's running statistics to the others before every forward). Only rank 0
    writes (:attr:`writer`). In a plain run every method is the identity and nothing
    communicates, so single-process results do not change by a bit.
    """

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    def local(self, batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (the first ranks get one more row
        when it does not split evenly)."""
        return batch if self.world == 1 else batch.tensor_split(self.world)[self.rank]

    def wrap(self, model: nn.Module, *, sync_bn: bool) -> nn.Module:
        """The module to train: ``model`` itself, or (distributed) ``DistributedDataParallel``
        around it, its BN layers first turned into SyncBatchNorm *in place* if ``sync_bn``
        (so ``model`` keeps its parameters, buffers and ``state_dict`` keys)."""
        if self.world == 1:
            return model
        if sync_bn:
            convert_sync(model, inplace=True)
        return nn.parallel.DistributedDataParallel(model)

    def loss(self, logits: Tensor, y: Tensor, global_batch: int) -> Tensor:
        """Cross-entropy of this rank's slice, scaled so that DDP's average over ranks of its
        gradient is the gradient of the mean loss over the global batch."""
        if self.world == 1:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits, y, reduction="sum") * (self.world / global_batch)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64, one all-reduce)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check(self, processes: int) -> None:
        """Raise ``ValueError`` unless this run has ``processes`` processes (a config's)."""
        if self.world != processes:
            raise ValueError(
                f"the config is for {processes} process(es), but this run has {self.world}; "
                f"start it with torchrun --nproc-per-node {processes}"
            )

    def agree(self, failure: Exception | None) -> None:
        """Raise rank 0's ``failure`` there, and a :class:`RunError` with its message on the
        other ranks (which wait for it: one broadcast), so no rank is left in a collective."""
        message = None if failure is None else f"rank 0 failed: {failure}"
        if self.world > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if failure is not None:
            raise failure
        if message is not None:
            raise RunError(message)
