"""SyncBatchNorm on real gloo process groups against one process holding the whole batch.

Each fixture below starts one group of processes (about 3 s of startup each on 2 cores) and runs
many checks in it; the tests compare what the ranks returned with a float64 oracle — torch's own
``nn.BatchNorm*d`` on the whole batch in one process — or with single-process training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from batchnorm import SyncBatchNorm, convert_from_sync, convert_sync
from batchnorm.functional import use_backend
from tests.conftest import CPU_BACKENDS
from tests.distributed import spawn
from tests.tolerances import F64_OFFSET_1E6, GRAD_F32, TOL

pytestmark = pytest.mark.distributed

FORMATS = {None: None, "channels_last": torch.channels_last, "3d": torch.channels_last_3d}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# name -> per-channel shape (C, *spatial), the batch split (rank 0, rank 1) of each step, options.
LAYER_CASES: dict[str, dict] = {
    "1d-NC": dict(shape=(5,), splits=[(3, 5), (6, 1)]),  # step 2: rank 1 has 1 value per channel
    "1d-NCL": dict(shape=(4, 7), splits=[(3, 3), (2, 5)]),
    "2d": dict(shape=(3, 4, 5), splits=[(2, 3), (4, 1)]),
    "2d-channels_last": dict(shape=(3, 4, 5), splits=[(2, 3), (1, 4)], fmt="channels_last"),
    "3d": dict(shape=(2, 3, 4, 5), splits=[(1, 2), (2, 2)]),
    "3d-channels_last": dict(shape=(2, 3, 4, 5), splits=[(2, 1), (1, 1)], fmt="3d"),
    "empty-rank": dict(shape=(3, 4, 4), splits=[(0, 6), (5, 0), (2, 2)]),
    "offset-1e4": dict(shape=(4, 6), splits=[(7, 9), (9, 7)], offset=1e4),
    # float64 at 1e6 ± 1: an E[x²] − E[x]² merge across ranks would lose 4 of float64's 16 digits
    "float64-offset-1e6": dict(shape=(4, 6), splits=[(7, 9), (3, 5)], offset=1e6, dtype="float64"),
    "cumulative": dict(shape=(3, 5), splits=[(2, 3), (4, 4), (1, 6)], momentum=None),
    "no-affine-no-stats": dict(shape=(3, 5), splits=[(2, 3), (3, 2)], affine=False, track=False),
    "no-bias": dict(shape=(3, 5), splits=[(2, 3), (3, 2)], bias=False),
    "population": dict(shape=(3, 5), splits=[(2, 3), (4, 4), (1, 6)], stats_mode="population"),
    "nonfinite": dict(shape=(3, 5), splits=[(2, 3), (3, 3), (4, 1)], nan_step=1),
    "bfloat16": dict(shape=(3, 8), splits=[(3, 5), (6, 2)], dtype="bfloat16"),
}
BACKENDS = [b for b in ("fused", "python") if b in CPU_BACKENDS]
CASE_IDS = [f"{name}-{backend}" for name in LAYER_CASES for backend in BACKENDS]


def _fmt(x: torch.Tensor, fmt: str | None) -> torch.Tensor:
    return x.contiguous(memory_format=FORMATS[fmt]) if fmt else x


def _make_inputs(name: str, backend: str, index: int) -> dict:
    spec = LAYER_CASES[name]
    gen = torch.Generator().manual_seed(index)
    c = spec["shape"][0]
    xs, gs = [], []
    for step, split in enumerate(spec["splits"]):
        shape = (sum(split), *spec["shape"])
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step) + step
        x = (x + spec.get("offset", 0.0)).to(getattr(torch, spec.get("dtype", "float32")))
        if spec.get("nan_step") == step:
            x[-1, 0] = float("nan")  # on the last rank only
        xs.append(x)
        gs.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype))
    return dict(
        name=name,
        backend=backend,
        c=c,
        xs=xs,
        gs=gs,
        splits=spec["splits"],
        fmt=spec.get("fmt"),
        momentum=spec.get("momentum", 0.1),
        affine=spec.get("affine", True),
        bias=spec.get("bias", True),
        track=spec.get("track", True),
        stats_mode=spec.get("stats_mode"),
        nan_step=spec.get("nan_step"),
        dtype=x.dtype,
        weight=torch.rand(c, generator=gen) + 0.5,
        bias_init=torch.randn(c, generator=gen),
    )


def _grad(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None or p.grad is None else p.grad.clone()


def _run_layer_case(rank: int, case: dict) -> dict:
    bn = SyncBatchNorm(
        case["c"],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        bias=case["bias"],
        stats_mode=case["stats_mode"],
        dtype=case["dtype"],
    )
    if case["affine"]:
        with torch.no_grad():
            bn.weight.copy_(case["weight"])
            if bn.bias is not None:
                bn.bias.copy_(case["bias_init"])
    steps = []
    for x, g, split in zip(case["xs"], case["gs"], case["splits"], strict=True):
        lo = sum(split[:rank])
        part = _fmt(x[lo : lo + split[rank]], case["fmt"]).clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = bn(part)
        y.backward(_fmt(g[lo : lo + split[rank]], case["fmt"]))
        fmt = FORMATS[case["fmt"]]
        steps.append(
            dict(
                y=y.detach(),
                dx=part.grad,
                dw=_grad(bn.weight),
                db=_grad(bn.bias),
                warnings=[str(w.message) for w in caught],
                layout_kept=fmt is None or (y.is_contiguous(memory_format=fmt)),
            )
        )
        bn.zero_grad(set_to_none=True)
    buffers = {k: v.clone() for k, v in bn.named_buffers()}
    buffers["nonfinite_skips"] = bn.nonfinite_skips.clone()  # a counter, not a buffer
    bn.eval()  # no collective: the running statistics (or this rank's batch if there are none)
    lo = sum(case["splits"][-1][:rank])
    eval_y = bn(case["xs"][-1][lo : lo + case["splits"][-1][rank]]) if case["track"] else None
    return dict(steps=steps, buffers=buffers, eval_y=eval_y)


def _error_messages(rank: int) -> list[str]:
    """Too few values over the whole group: every rank raises the same error, none hangs."""
    messages = []
    for x in (torch.randn(1 - rank, 3), torch.randn(0, 3)):  # 1 value in total, then none
        try:
            SyncBatchNorm(3)(x)
        except ValueError as e:
            messages.append(str(e))
    return messages


def _collectives(rank: int) -> dict[str, list[str]]:
    """Which torch.distributed calls three layers make in a forward, a backward and in eval."""
    calls: list[str] = []
    names = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast")
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        model = nn.Sequential(SyncBatchNorm(3), nn.ReLU(), SyncBatchNorm(3), SyncBatchNorm(3))
        x = torch.randn(4 * rank, 3, 5, requires_grad=True)  # rank 0 is empty
        y = model(x)
        seen = {"forward": calls[:]}
        calls.clear()
        y.backward(torch.randn_like(y))
        seen["backward"] = calls[:]
        calls.clear()
        model.eval()
        model(x)
        seen["eval"] = calls[:]
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return seen


def layer_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    results = {}
    for case in cases:
        with use_backend(case["backend"]):
            results[f"{case['name']}-{case['backend']}"] = _run_layer_case(rank, case)
    results["errors"] = _error_messages(rank)
    results["collectives"] = _collectives(rank)
    return results


@pytest.fixture(scope="module")
def layer_runs(tmp_path_factory):
    cases = [
        _make_inputs(name, backend, i)
        for i, (name, backend) in enumerate((n, b) for n in LAYER_CASES for b in BACKENDS)
    ]
    results = spawn(layer_worker, 2, cases, tmp_path_factory.mktemp("layers"))
    return {f"{c['name']}-{c['backend']}": c for c in cases}, results


def _oracle(case: dict, x: torch.Tensor) -> nn.Module:
    ref = TORCH_BN[x.dim()](
        case["c"],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        bias=case["bias"],
        dtype=torch.float64,
    )
    if case["affine"]:
        with torch.no_grad():
            ref.weight.copy_(case["weight"])
            if ref.bias is not None:
                ref.bias.copy_(case["bias_init"])
    return ref


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_two_ranks_equal_one_process_with_the_whole_batch(layer_runs, case_id):
    cases, results = layer_runs
    case = cases[case_id]
    ranks = [r[case_id] for r in results]
    # outputs and statistics, then gradients, against the float64 oracle
    tol, grad_tol = TOL[torch.float32], GRAD_F32
    if case["dtype"] == torch.float64:
        tol = grad_tol = F64_OFFSET_1E6
    elif case["dtype"] == torch.bfloat16:  # outputs rounded to bfloat16; statistics in float64
        tol = grad_tol = TOL[torch.bfloat16]
    ref = _oracle(case, case["xs"][0])
    batch_means, batch_vars = [], []
    for step, (x, g) in enumerate(zip(case["xs"], case["gs"], strict=True)):
        got = [r["steps"][step] for r in ranks]
        if step == case["nan_step"]:
            # non-finite global statistics: every rank skips the update and warns once
            assert all(len(s["warnings"]) == 1 and "not finite" in s["warnings"][0] for s in got)
            continue
        assert all(not s["warnings"] for s in got)
        xd = x.double().requires_grad_()
        y = ref(xd)
        y.backward(g.double())
        batch_means.append(x.double().mean(dim=[d for d in range(x.dim()) if d != 1]))
        batch_vars.append(x.double().var(dim=[d for d in range(x.dim()) if d != 1]))
        assert all(s["layout_kept"] for s in got)
        torch.testing.assert_close(torch.cat([s["y"] for s in got]).double(), y, **tol)
        torch.testing.assert_close(torch.cat([s["dx"] for s in got]).double(), xd.grad, **grad_tol)
        if case["affine"]:
            # each rank returns its own share; DDP's average (times the world size) is the sum
            dw = sum(s["dw"].double() for s in got)
            torch.testing.assert_close(dw, ref.weight.grad, **grad_tol)
            if case["bias"]:
                db = sum(s["db"].double() for s in got)
                torch.testing.assert_close(db, ref.bias.grad, **grad_tol)
            ref.zero_grad()
    # The running statistics: identical on both ranks (bit for bit) and equal to the oracle's.
    assert ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys()
    for key, value in ranks[0]["buffers"].items():
        assert torch.equal(value, ranks[1]["buffers"][key]), key
    if not case["track"]:
        assert ranks[0]["buffers"].keys() == {"nonfinite_skips"}  # no buffer at all, as torch
        return
    buffers = ranks[0]["buffers"]
    if case["stats_mode"] == "population":  # Alg. 2: E[mu_B], E[m/(m-1) var_B] over global batches
        expected_mean = torch.stack(batch_means).mean(0)
        expected_var = torch.stack(batch_vars).mean(0)
    else:
        expected_mean, expected_var = ref.running_mean, ref.running_var
    torch.testing.assert_close(buffers["running_mean"].double(), expected_mean, **tol)
    torch.testing.assert_close(buffers["running_var"].double(), expected_var, **tol)
    assert int(buffers["num_batches_tracked"]) == len(batch_means)
    assert int(buffers["nonfinite_skips"]) == len(case["xs"]) - len(batch_means)
    eval_y = torch.cat([r["eval_y"] for r in ranks]).double()
    w, b = (ref.weight, ref.bias) if case["affine"] else (None, None)
    expected = F.batch_norm(case["xs"][-1].double(), expected_mean, expected_var, w, b, eps=1e-5)
    torch.testing.assert_close(eval_y, expected, **tol)


def test_too_few_values_over_the_group_raise_on_every_rank(layer_runs):
    _, results = layer_runs
    for rank, r in enumerate(results):
        assert len(r["errors"]) == 2
        one, none = r["errors"]
        assert "SyncBatchNorm(3)" in one and "got 1 over the 2 ranks" in one
        assert f"shape {(1 - rank, 3)}" in one
        assert "got 0 over the 2 ranks" in none


def test_one_collective_per_layer_in_forward_and_backward(layer_runs):
    _, results = layer_runs
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    for r in results:
        assert r["collectives"] == dict(forward=[gather] * 3, backward=["all_reduce"] * 3, eval=[])


# -- DistributedDataParallel training: 2 ranks vs 1 process, a few SGD steps ---------------------

DDP_SPLITS = [(8, 8), (3, 13), (0, 16), (11, 5)]  # uneven, and an empty rank at step 3


def _ddp_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def ddp_worker(rank: int, world_size: int, inputs: dict) -> dict:
    model = _ddp_model().double()
    model.load_state_dict(inputs["state"])
    synced = convert_sync(model)
    # Buffers are not broadcast from rank 0: every rank computes the same running statistics.
    ddp = nn.parallel.DistributedDataParallel(synced, forward_sync_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for x, y, split in zip(inputs["xs"], inputs["ys"], DDP_SPLITS, strict=True):
        lo = sum(split[:rank])
        xr, yr = x[lo : lo + split[rank]], y[lo : lo + split[rank]]
        # This rank's share of the global mean loss, times world_size, which DDP's average divides
        # by: the gradients are then those of the single-process loss, whatever the split.
        loss = F.cross_entropy(ddp(xr), yr, reduction="sum") * world_size / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    back = convert_from_sync(synced)
    return dict(
        state=back.state_dict(),
        classes=[type(m).__name__ for m in back.modules()],
        sync_classes=[type(m).__name__ for m in synced.modules()],
    )


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    # float64: the ranks add their sums in another order than one process does, and after five
    # momentum-SGD steps float32 rounding of that order reaches ~2e-4 on some CPUs; in float64 the
    # same comparison holds to ~1e-15, so a real difference cannot hide behind a loose tolerance.
    torch.manual_seed(0)
    model = _ddp_model().double()
    xs = [torch.randn(16, 3, 5, 5, dtype=torch.float64) * 2 + 1 for _ in DDP_SPLITS]
    ys = [torch.randint(0, 3, (16,)) for _ in DDP_SPLITS]
    inputs = dict(state=model.state_dict(), xs=xs, ys=ys)
    return model, inputs, spawn(ddp_worker, 2, inputs, tmp_path_factory.mktemp("ddp"))


def test_ddp_training_on_two_ranks_matches_one_process(ddp_runs):
    model, inputs, results = ddp_runs
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(inputs["xs"], inputs["ys"], strict=True):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = model.state_dict()
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), f"ranks differ in {key}"
        if value.is_floating_point():
            torch.testing.assert_close(
                value, expected[key], **TOL[torch.float64], msg=lambda m, key=key: f"{key}: {m}"
            )
        else:
            assert torch.equal(value, expected[key]), key
    assert results[0]["state"].keys() == expected.keys()


def test_convert_sync_round_trip_under_ddp(ddp_runs):
    model, _, results = ddp_runs
    assert results[0]["classes"] == [type(m).__name__ for m in model.modules()]
    assert results[0]["sync_classes"].count("SyncBatchNorm") == 2


# -- subgroups: 3 ranks, group A = {0, 2} synchronized, group B = {1} alone -------------------------


def subgroup_worker(rank: int, world_size: int, inputs: dict) -> dict:
    group_a = dist.new_group([0, 2])  # every rank calls new_group for every group
    group_b = dist.new_group([1])
    mine = group_b if rank == 1 else group_a
    x = inputs["xb"] if rank == 1 else inputs["xa"][:3] if rank == 0 else inputs["xa"][3:]
    g = inputs["gb"] if rank == 1 else inputs["ga"][:3] if rank == 0 else inputs["ga"][3:]
    out = {}
    layer = nn.Sequential(SyncBatchNorm(3, process_group=mine))
    xr = x.clone().requires_grad_()
    layer(xr).backward(g)
    out["group"] = dict(dx=xr.grad, dw=layer[0].weight.grad, buffers=dict(layer.named_buffers()))
    # The copy made by convert_from_sync shares the process group (it cannot be deep-copied).
    back = convert_from_sync(layer)
    again = convert_sync(back, mine)
    out["round_trip"] = [type(back[0]).__name__, again[0].process_group is mine]
    # The whole world of 3, uneven with an empty rank: exercises the merge of an odd rank count.
    lo, n = [0, 2, 2][rank], [2, 0, 5][rank]
    xw = inputs["xw"][lo : lo + n].clone().requires_grad_()
    world_bn = SyncBatchNorm(3)
    y = world_bn(xw)
    y.backward(inputs["gw"][lo : lo + n])
    out["world"] = dict(y=y.detach(), dx=xw.grad, buffers=dict(world_bn.named_buffers()))
    if rank == 1:  # a layer given a group its rank is not in: a clear error, no collective
        try:
            SyncBatchNorm(3, process_group=group_a)(x)
        except ValueError as e:
            out["not_member"] = str(e)
    return out


@pytest.fixture(scope="module")
def subgroup_runs(tmp_path_factory):
    inputs = dict(
        xa=torch.randn(7, 3, 4) * 3 + 2,
        ga=torch.randn(7, 3, 4),
        xb=torch.randn(5, 3, 4) - 4,
        gb=torch.randn(5, 3, 4),
        xw=torch.randn(7, 3, 6),
        gw=torch.randn(7, 3, 6),
    )
    return inputs, spawn(subgroup_worker, 3, inputs, tmp_path_factory.mktemp("subgroups"))


def _oracle_step(x: torch.Tensor, g: torch.Tensor) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    ref = nn.BatchNorm1d(x.shape[1], dtype=torch.float64)
    xd = x.double().requires_grad_()
    y = ref(xd)
    y.backward(g.double())
    return ref, y, xd.grad


def test_subgroups_synchronize_only_within_the_group(subgroup_runs):
    inputs, results = subgroup_runs
    ref_a, _, dx_a = _oracle_step(inputs["xa"], inputs["ga"])
    ref_b, _, dx_b = _oracle_step(inputs["xb"], inputs["gb"])
    got_a = torch.cat([results[0]["group"]["dx"], results[2]["group"]["dx"]])
    torch.testing.assert_close(got_a.double(), dx_a, **GRAD_F32)
    torch.testing.assert_close(results[1]["group"]["dx"].double(), dx_b, **GRAD_F32)
    dw_a = results[0]["group"]["dw"] + results[2]["group"]["dw"]
    torch.testing.assert_close(dw_a.double(), ref_a.weight.grad, **GRAD_F32)
    for rank, ref in ((0, ref_a), (1, ref_b), (2, ref_a)):
        buffers = results[rank]["group"]["buffers"]
        torch.testing.assert_close(buffers["0.running_mean"].double(), ref.running_mean)
        torch.testing.assert_close(buffers["0.running_var"].double(), ref.running_var)
    for rank in range(3):
        assert results[rank]["round_trip"] == ["BatchNorm1d", True]


def test_world_of_three_ranks_with_an_empty_one(subgroup_runs):
    inputs, results = subgroup_runs
    ref, y, dx = _oracle_step(inputs["xw"], inputs["gw"])
    world = [r["world"] for r in results]
    assert world[1]["y"].shape == (0, 3, 6)
    torch.testing.assert_close(torch.cat([w["y"] for w in world]).double(), y, **TOL[torch.float32])
    torch.testing.assert_close(torch.cat([w["dx"] for w in world]).double(), dx, **GRAD_F32)
    for w in world:
        assert torch.equal(w["buffers"]["running_var"], world[0]["buffers"]["running_var"])
        torch.testing.assert_close(w["buffers"]["running_var"].double(), ref.running_var)


def test_a_rank_outside_the_group_gets_a_clear_error(subgroup_runs):
    _, results = subgroup_runs
    message = results[1]["not_member"]
    assert "SyncBatchNorm(3)" in message and "not a member" in message
    assert "not_member" not in results[0] and "not_member" not in results[2]
