"""SyncBatchNorm against per-process BN: one training step (forward + backward) on 2 CPU processes.

Starts ``--nproc`` processes (gloo, one intra-op thread each). Every rank holds the same per-rank
batch shape and times, interleaved round by round so that the machine's drift hits all alike:

- ``torch``: ``torch.nn.BatchNorm*d``, per-rank statistics (torch's SyncBatchNorm refuses CPU);
- ``ours``: ``batchnorm.BatchNorm*d``, per-rank statistics;
- ``sync``: ``batchnorm.SyncBatchNorm``, statistics of the union of the ranks' batches;
- ``comm``: the sync layer's two collectives alone, with the same sizes: the forward's
  ``all_gather`` of 3·C float64 per rank and the backward's ``all_reduce`` of 2·C float64;
- ``in coll.``: the wall time a SyncBN step spends inside those two calls (measured by wrapping
  them during the ``sync`` blocks): the messages plus the wait for the slower rank.

Per layer and step SyncBatchNorm makes exactly those two collectives (one per forward, one per
backward; no bucketing across layers). A step is ``autograd.grad`` of the output w.r.t. the input,
γ and β. Before each timed block the ranks meet at a barrier; the block's time per step is the
slowest rank's (a synchronized step ends when the last rank does). Each cell is the median over
rounds; "comm share" is comm / sync, "in coll. share" is in coll. / sync (mean over ranks).

    python benchmarks/bm_sync.py                 # the table in benchmarks/README.md
    python benchmarks/bm_sync.py --quick
    python benchmarks/bm_sync.py --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm.functional import kernels

SHAPES: list[tuple[str, tuple[int, ...], torch.memory_format | None]] = [
    ("2-D", (32, 1024), None),
    ("2-D", (256, 1024), None),
    ("NCHW", (2, 256, 14, 14), None),  # the Group Norm paper's 2 images per device
    ("NCHW", (8, 64, 56, 56), None),
    ("NCHW", (32, 64, 56, 56), None),
    ("NCHW", (32, 256, 14, 14), None),
    ("NCHW", (32, 512, 7, 7), None),
    ("NHWC", (32, 64, 56, 56), torch.channels_last),
]
QUICK = [SHAPES[i] for i in (0, 2, 4)]
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
OURS_BN = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}


class _TimedCollectives:
    """Within ``with``: adds the wall time of the sync layer's collectives to ``self.seconds``."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

    def _timed(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return call

    def __enter__(self) -> _TimedCollectives:
        for name, fn in self._originals.items():
            setattr(dist, name, self._timed(fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def _block(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Over ``n`` calls started together: seconds per call of the slowest rank, and seconds per
    call spent inside collectives (mean over ranks)."""
    dist.barrier()
    with _TimedCollectives() as timed:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
    slowest = torch.tensor(elapsed / n, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    inside = torch.tensor(timed.seconds / n, dtype=torch.float64)
    dist.all_reduce(inside)
    return float(slowest), float(inside) / dist.get_world_size()


def bench_shape(shape, fmt, rounds: int, budget: float) -> dict[str, float]:
    c, world = shape[1], dist.get_world_size()
    x = torch.randn(shape)
    x = (x.contiguous(memory_format=fmt) if fmt else x).requires_grad_()
    g = torch.randn_like(x)
    layers = {
        "torch": TORCH_BN[x.dim()](c),
        "ours": OURS_BN[x.dim()](c),
        "sync": batchnorm.SyncBatchNorm(c),
    }

    def step(layer: nn.Module) -> Callable[[], object]:
        return lambda: torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)

    local = torch.randn(3, c, dtype=torch.float64)
    gathered = torch.empty(world * 3, c, dtype=torch.float64)
    sums = torch.randn(2, c, dtype=torch.float64)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def comm() -> None:
        all_gather(gathered, local)
        dist.all_reduce(sums)

    fns = {name: step(layer) for name, layer in layers.items()} | {"comm": comm}
    # Calls per block from the slowest variant (sync), agreed on by all ranks.
    fns["sync"]()
    one, _ = _block(fns["sync"], 2)
    n = max(3, min(1000, int(budget / max(one, 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in [*fns, "in_coll"]}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds, inside = _block(fn, n)
            samples[name].append(seconds)
            if name == "sync":
                samples["in_coll"].append(inside)
    return {k: statistics.median(v) for k, v in samples.items()}


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        shapes = QUICK if args.quick else SHAPES
        rounds = 3 if args.quick else args.rounds
        lines = [
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, {world} processes × 1 thread, gloo; "
            f"{kernels.status().split(' from ')[0]}; median of {rounds} interleaved rounds",
            "",
            "| layout | per-rank shape | torch BN ms | ours BN ms | SyncBN ms | SyncBN / ours "
            "| SyncBN / torch | comm ms | comm share | in coll. ms | in coll. share |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        if rank == 0:
            print("\n".join(lines), flush=True)
        for layout, shape, fmt in shapes:
            r = bench_shape(shape, fmt, rounds, args.budget)
            line = (
                f"| {layout} | {'×'.join(map(str, shape))} | {r['torch'] * 1e3:.3f} "
                f"| {r['ours'] * 1e3:.3f} | {r['sync'] * 1e3:.3f} | {r['sync'] / r['ours']:.2f} "
                f"| {r['sync'] / r['torch']:.2f} | {r['comm'] * 1e3:.3f} "
                f"| {r['comm'] / r['sync']:.0%} | {r['in_coll'] * 1e3:.3f} "
                f"| {r['in_coll'] / r['sync']:.0%} |"
            )
            lines.append(line)
            if rank == 0:
                print(line, flush=True)
        if rank == 0 and args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(lines) + "\n")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--budget", type=float, default=0.2, help="seconds per timed block")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"cannot benchmark: {kernels.status()}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main,
            args=(args.nproc, os.path.join(tmp, "store"), args),
            nprocs=args.nproc,
            start_method="spawn",
        )


if __name__ == "__main__":
    main()
