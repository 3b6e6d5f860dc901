"""Real ``torch.distributed`` (gloo) process groups started from inside pytest.

:func:`spawn` starts ``world_size`` fresh processes; each joins a gloo group through a file store in
the test's temporary directory (no TCP port to choose, so concurrent runs on one machine cannot
collide), runs ``worker(rank, world_size, inputs)`` and saves what it returns. The parent gets one
result per rank and makes the assertions. A worker that raises fails the test with its traceback; a
group that does not finish within ``timeout`` seconds is killed and fails the test instead of
hanging CI, and every collective inside the workers gives up after ``COLLECTIVE_TIMEOUT`` seconds.
Workers treat warnings as errors, like the rest of the suite.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchnorm.functional import kernels

COLLECTIVE_TIMEOUT = 60  # also bounds the rendezvous: a loaded machine may start ranks slowly


def _entry(rank: int, world_size: int, worker: Callable, tmp: str) -> None:
    warnings.simplefilter("error")
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    try:
        inputs = torch.load(Path(tmp) / "inputs.pt", weights_only=True)
        torch.manual_seed(rank)
        result = worker(rank, world_size, inputs)
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The result is on disk: skip the interpreter's teardown of torch (about 2 s per process). A
    # worker that raised never gets here; torch.multiprocessing reports its traceback.
    os._exit(0)


def spawn(
    worker: Callable[[int, int, Any], Any],
    world_size: int,
    inputs: Any,
    tmp_path: Path,
    timeout: float = 180.0,
) -> list[Any]:
    """Run ``worker`` on ``world_size`` gloo ranks; returns each rank's result, in rank order.

    ``worker`` must be a module-level function (it is pickled by reference); ``inputs`` and the
    results must be loadable with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    lists, tuples, dicts, None).
    """
    kernels.load()  # build the fused kernels once, here, rather than in every rank at once
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, tmp_path / "inputs.pt")
    ctx = mp.start_processes(
        _entry,
        args=(world_size, worker, str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{worker.__name__} on {world_size} ranks did not finish in {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
