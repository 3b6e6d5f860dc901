"""Synchronized Batch Normalization: batch statistics over the union of every rank's mini-batch.

Ioffe & Szegedy (arXiv:1502.03167) normalize each activation with the statistics of "the
mini-batch" (Alg. 1). With data parallelism each process (rank) holds only a part of it; plain BN
normalizes with that part's statistics. ``SyncBatchNorm`` computes Alg. 1 over the union of the
parts, as if one process held the whole batch, on ``torch.distributed`` (gloo for CPU tensors,
NCCL for CUDA tensors). Per layer and training step it issues exactly two collectives:

- **forward, one ``all_gather``** of each rank's float64 ``(count, mean, M2)`` per channel
  (3·C values), merged on every rank with Chan et al.'s parallel formula (:func:`merge_moments`)
  in a fixed pairwise order over ranks;
- **backward, one ``all_reduce(SUM)``** of the two per-channel sums the input gradient needs,
  Σ g and Σ g (x − μ) (2·C float64 values; see :mod:`batchnorm.functional.steps`).

Why a gather and not an all-reduce of sums: a variance needs either E[x²] − E[x]² (cancels
catastrophically, e.g. float32 1e4 + N(0, 1), pytorch#5410) or a shift known to every rank before
the collective — without a second collective the only candidate is ``running_mean``, which is 0
on the first steps and stale later, exactly when it matters. Chan's merge is exact in exact
arithmetic and adds only non-negative terms (δ²·n_a·n_b/n), but it is not a sum, so it cannot be
an all-reduce op. Each rank receives W·3·C values where an all-reduce would move about 2·3·C; for
BN's short vectors (C ≤ a few thousand) both are latency-bound at the world sizes SyncBN is used
with, and the merge is log2(W) vectorized steps. Every rank merges the same gathered values in the same order,
so all ranks get bitwise-identical statistics and running buffers (DDP's buffer broadcast is
redundant for these layers).

The per-rank steps are the library's split steps (:func:`~batchnorm.functional.moments`,
:func:`~batchnorm.functional.normalize`, :func:`~batchnorm.functional.backward_reduce`,
:func:`~batchnorm.functional.backward_elementwise`): the fused CPU kernels on CPU, torch ops on
other devices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional.stats import Moments, merge_moments
from ..functional.steps import backward_elementwise, backward_reduce, moments, normalize
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, StatsMode, _BatchNormMixin
from .surgery import copy_model, name_layers, replace_modules, swap_class

__all__ = ["SyncBatchNorm", "convert_from_sync", "convert_sync", "gather_moments"]


# -- the statistics: one all_gather, then Chan's merge in a fixed order -------------------------


def _local_moments(x: Tensor) -> Tensor:
    """(3, C) float64: this rank's per-channel count, mean and M2 = Σ (x − mean)²; zeros if empty."""
    c = x.shape[1]
    m = x.numel() // c if c else 0
    if m == 0:  # an empty rank contributes count 0, which merge_moments ignores
        return torch.zeros(3, c, dtype=torch.float64, device=x.device)
    mean, var = moments(x)  # Alg. 1, per rank: mu_B and the biased var_B (float64)
    return torch.stack([torch.full_like(mean, m), mean, var * m])


def _merge_in_rank_order(parts: Moments) -> Moments:
    """Merge moments stacked along dim 0 (one row per rank) pairwise: (0,1), (2,3), ... then
    again, so the result depends only on the gathered values, never on which rank computes it."""
    while parts.count.shape[0] > 1:
        if parts.count.shape[0] % 2:  # an odd row out merges with an empty one
            pad = torch.zeros_like(parts.count[:1])
            parts = Moments(*(torch.cat([t, pad]) for t in (parts.count, parts.mean, parts.m2)))
        even = Moments(parts.count[0::2], parts.mean[0::2], parts.m2[0::2])
        odd = Moments(parts.count[1::2], parts.mean[1::2], parts.m2[1::2])
        parts = merge_moments(even, odd)
    return Moments(parts.count[0], parts.mean[0], parts.m2[0])


@torch.no_grad()  # gradients flow through _SyncBatchNormFunction's closed-form backward instead
def gather_moments(x: Tensor, group: Any = None) -> Moments:
    """Per-channel moments of the union of every rank's ``x`` in ``group`` (one ``all_gather``).

    Every rank of the group must call it (an empty ``x`` contributes nothing). The result is
    float64 and bitwise identical on every rank.
    """
    local = _local_moments(x)
    world = dist.get_world_size(group)
    gathered = local.new_empty(world * 3, local.shape[1])
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (gloo and NCCL have both).
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, local, group=group)
    per_rank = gathered.view(world, 3, -1)
    return _merge_in_rank_order(Moments(per_rank[:, 0], per_rank[:, 1], per_rank[:, 2]))


# -- the transform with global statistics, and its backward with one all_reduce ----------------


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = γ (x − μ) / sqrt(σ² + ε) + β with global (μ, σ²) over ``count`` values in ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, group):
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps, ctx.group = count, eps, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        if x.numel() == 0:
            return torch.empty_like(x)
        return normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.numel() > 0:
            sum_g, sum_gc = backward_reduce(grad_y, x, mean)  # this rank's Σ g, Σ g (x − μ)
        else:
            sum_g = sum_gc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        # γ/β: this rank's sums, like torch's SyncBatchNorm. Everything here is the gradient of the
        # sum of the ranks' losses; DDP divides by the world size, which gives the single-process
        # gradient when the ranks' losses average to the global loss (equal batches and a mean
        # loss, or losses scaled by local/global batch size). An empty rank's share is zeros, not None:
        # an optimizer skips parameters whose .grad is None, and hand-written gradient averaging
        # needs a tensor on every rank.
        grad_w = (sum_gc * torch.rsqrt(var + ctx.eps)).to(weight.dtype) if need_w else None
        grad_b = sum_g.to(ctx.bias_dtype) if need_b else None
        grad_x = None
        if need_x:
            # The one backward collective: every rank, the empty one too, must take part.
            sums = torch.stack([sum_g, sum_gc])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            if x.numel() > 0:
                grad_x = backward_elementwise(
                    grad_y, x, mean, var, weight, sums[0], sums[1], ctx.count, ctx.eps
                )
            else:
                grad_x = torch.zeros_like(x)
        return grad_x, grad_w, grad_b, None, None, None, None, None


# -- the layer -----------------------------------------------------------------------------------


class SyncBatchNorm(_BatchNormMixin, _BatchNorm):
    """BN over ``(N, C, ...)`` inputs (2-D to 5-D) with statistics synchronized across processes.

    Drop-in for :class:`torch.nn.SyncBatchNorm` — the same constructor (with ``process_group``),
    the same parameters and buffers, so ``state_dict``s load strictly into torch's
    ``SyncBatchNorm`` and ``BatchNorm*d`` and back — that also runs on CPU tensors with the gloo
    backend. Our layers' extras (``stats_mode``, ``guard_nonfinite``, ``freeze_stats``) work as
    documented on :class:`~batchnorm.nn.modules._BatchNormMixin`.

    It subclasses torch's ``_BatchNorm`` (like ``nn.BatchNorm2d``), not ``nn.SyncBatchNorm``:
    ``DistributedDataParallel`` refuses CPU models that contain an ``nn.SyncBatchNorm`` instance
    ("SyncBatchNorm layers only work with GPU modules").

    In training, the statistics are those of the union of the mini-batches of every rank in
    ``process_group`` (default: the whole world): one ``all_gather`` in the forward, one
    ``all_reduce`` in the backward (see the module docstring). Ranks may hold different batch
    sizes, including none at all (N = 0): an empty rank contributes nothing and still takes part in
    both collectives, so it must run the forward and the backward like every other rank. At least
    two values per channel are needed over the whole group; a single rank may have just one.

    The running statistics are updated on every rank from the global statistics with the same
    rule and non-finite guard as our ``BatchNorm*d`` (the unbiased variance uses the global count),
    so they stay identical across ranks.

    Falls back to plain BN (no communication) in eval mode, with ``freeze_stats``, when
    ``torch.distributed`` is not initialized, or when the group has one rank, so the same model
    runs in a single process. ``γ``/``β`` gradients are this rank's share (like torch's): wrap the
    model in ``DistributedDataParallel``, which averages them. Double backward is not supported.

    Errors: a bad input (wrong rank or channel count) raises on the rank that has it, before any
    collective, and the other ranks then wait in theirs until the process group's ``timeout``.
    """

    _ndims = (2, 3, 4, 5)
    _shape_doc = "(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        stats_mode: StatsMode | None = None,
        guard_nonfinite: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            stats_mode=stats_mode,
            guard_nonfinite=guard_nonfinite,
        )
        self.process_group = process_group
        # For convert_from_sync: the class convert_sync made this layer from, and the rank of the
        # last input seen (which picks BatchNorm1d/2d/3d when there is no such class).
        self.plain_class: type[nn.Module] | None = None
        self.last_input_dim: int | None = None

    def _sync_group(self, batch_stats: bool) -> Any | None:
        """The process group to synchronize over, or None to run as plain BN."""
        if not (self.training and batch_stats and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group
        # dist.new_group() returns this marker on the ranks outside the group.
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"{self._where()}: this rank ({dist.get_rank()}) is not a member of the layer's "
                "process_group. Every rank must pass the group it belongs to (dist.new_group() "
                "returns a non-member marker on the other ranks)."
            )
        if group is None:
            group = dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        batch_stats = (self.training and not self.freeze_stats) or self.running_mean is None
        if isinstance(input, Tensor):
            self.last_input_dim = input.dim()
        group = self._sync_group(batch_stats)
        if group is None:
            return super().forward(input)  # plain BN, the same code as BatchNorm1d/2d/3d
        # Dims, channels, dtype, eps, momentum: but not m > 1, which only the group can judge.
        self._check(input, batch_stats=False)
        total = gather_moments(input, group)  # collective 1 (forward)
        count = int(total.count[0])  # on CUDA: one host sync per layer, like torch's
        if count <= 1:
            raise ValueError(
                f"{self._where()}: expected more than 1 value per channel when training, got "
                f"{count} over the {dist.get_world_size(group)} ranks of the process group (this "
                f"rank's input has shape {tuple(input.shape)}). Batch statistics (Alg. 1) need "
                "m > 1 values per channel."
            )
        mean, var = total.mean, total.var  # Alg. 1 over the union: mu_B, biased var_B
        y = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, mean, var, count, self.eps, group
        )  # collective 2 in its backward
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, var, count)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None):
        """torch's name for :func:`convert_sync` (in place, as torch's is)."""
        return convert_sync(module, process_group, inplace=True)


# -- converting a model: convert_sync is torch.nn.SyncBatchNorm.convert_sync_batchnorm for our
# layer, plus the way back, which torch does not have. After synchronized training,
# convert_from_sync returns the model to per-process layers (for single-process evaluation,
# export, or fine-tuning). Both keep parameters, running statistics, requires_grad and the
# train/eval state; between our own layers also stats_mode, guard_nonfinite, freeze_stats and the
# counters. batchnorm.tools re-exports both.

# Exact types (subclasses such as timm's BatchNormAct2d add behaviour we would drop).
_TO_SYNC = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)
_BY_INPUT_DIM = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


def convert_sync(
    model: nn.Module, process_group: Any | None = None, *, inplace: bool = False
) -> nn.Module:
    """Replace every BN layer of ``model`` by :class:`~batchnorm.nn.SyncBatchNorm`.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and our
    ``BatchNorm1d/2d/3d`` (exact types; subclasses, layers that already are our
    ``SyncBatchNorm`` and other layers are left alone). The new layers synchronize over
    ``process_group`` (default: the whole world, looked up at each forward, so the conversion may
    happen before ``init_process_group``) and remember their original class for
    :func:`convert_from_sync`. Call it before wrapping the model in ``DistributedDataParallel``.

    Returns the converted model: a copy unless ``inplace=True``. In place, the new layers hold the
    same parameter and buffer tensors as the old ones (as torch's ``convert_sync_batchnorm``
    does), so an optimizer built before the conversion keeps working.
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) not in _TO_SYNC:
            return None
        new = swap_class(m, SyncBatchNorm)
        new.process_group = process_group
        new.plain_class = type(m)
        return new

    return name_layers(replace_modules(copy_model(model, "convert_sync", inplace), make))


def convert_from_sync(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every :class:`~batchnorm.nn.SyncBatchNorm` of ``model`` by a per-process BN layer.

    The new layer is of the class :func:`convert_sync` converted from (e.g. ``torch.nn.BatchNorm2d``
    comes back as ``torch.nn.BatchNorm2d``); for a layer that was built as ``SyncBatchNorm``, our
    ``BatchNorm1d/2d/3d`` chosen by the rank of the last input it saw. Returns the converted model:
    a copy unless ``inplace=True`` (then sharing parameter and buffer tensors, as above).
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) is not SyncBatchNorm:
            return None
        cls = m.plain_class or _BY_INPUT_DIM.get(m.last_input_dim)
        if cls is None:
            raise ValueError(
                f"convert_from_sync: cannot tell whether {m._where()} should become BatchNorm1d, "
                "2d or 3d: it was not made by convert_sync and has not seen an input yet. Run one "
                "forward pass first."
            )
        new = swap_class(m, cls)
        if isinstance(new, nn.SyncBatchNorm):
            new.process_group = m.process_group
        return new

    return name_layers(replace_modules(copy_model(model, "convert_from_sync", inplace), make))
