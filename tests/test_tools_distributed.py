"""recalibrate across ranks: two real gloo processes must get what one process gets from all the
batches, for both estimators, also when one rank has no data; different models fail, not hang."""

import datetime
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm.tools import recalibrate
from tests.tolerances import RECAL_F64

pytestmark = pytest.mark.distributed
WORLD = 2
TIMEOUT = 120  # seconds for the whole group; a deadlock fails the test instead of hanging CI


def _model(extra_layer: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6),  # torch's: the pre-hook path
        nn.ReLU(),
        nn.Linear(6, 3, bias=False),
        batchnorm.BatchNorm1d(3),  # ours: the population-mode path
    ]
    if extra_layer:
        layers.append(nn.BatchNorm1d(3))
    return nn.Sequential(*layers).double()


def _data(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = {0: [5, 8, 3], 1: [7, 4]}[rank]  # unequal batches, unequal counts per rank
    return [
        torch.randn(n, 4, generator=gen, dtype=torch.float64) * (1 + rank) + rank for n in sizes
    ]


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    warnings.simplefilter("error")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for estimator in ("paper", "pooled"):
            model = _model()
            report = recalibrate(model, _data(rank), estimator)
            results[estimator] = (_stats(model), [x.samples for x in report.layers], report.batches)
        model = _model()
        recalibrate(model, _data(0) if rank == 0 else [], "pooled")  # rank 1 has no data
        results["one-empty"] = _stats(model)
        try:
            recalibrate(_model(extra_layer=rank == 1), _data(rank))
        except RuntimeError as e:
            results["mismatch"] = str(e)
        torch.save(results, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_recalibrate_reduces_over_two_gloo_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(rank, str(tmp_path / "store"), str(tmp_path)))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"recalibrate hung for more than {TIMEOUT} s"
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]

    everything = _data(0) + _data(1)
    for estimator in ("paper", "pooled"):
        single = _model()
        report = recalibrate(single, everything, estimator)  # one process, all the batches
        for rank in range(WORLD):
            stats, samples, batches = results[rank][estimator]
            assert batches == 5 and samples == [x.samples for x in report.layers] == [27, 27]
            for k, v in _stats(single).items():
                torch.testing.assert_close(stats[k], v, **RECAL_F64, msg=f"{estimator} {k}")
    alone = _model()
    recalibrate(alone, _data(0), "pooled")
    for rank in range(WORLD):
        for k, v in _stats(alone).items():
            torch.testing.assert_close(results[rank]["one-empty"][k], v, **RECAL_F64)
        assert "BN layers differ between ranks" in results[rank]["mismatch"]
