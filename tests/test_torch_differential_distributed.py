"""PyTorch's distributed SyncBatchNorm cases, ported to gloo on CPU, plus the distributed defects
of issue 18 (DDP inference on one rank, DTensor).

The SyncBatchNorm cases of torch/testing/_internal/distributed/distributed_test.py run on CUDA
(torch's nn.SyncBatchNorm refuses CPU tensors); each is rewritten here from reading it, against
our SyncBatchNorm on gloo, with the same reference torch's tests use: the unconverted torch model
trained in one process on the global batch. In float64 (the rank split changes the rounding order
of float32 sums; see test_sync_distributed.py), except where the case is about a dtype.

One group of two processes runs every case (process start-up dominates); one single-process group
runs DTensor on a 1-device mesh.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import SyncBatchNorm
from tests.distributed import spawn
from tests.tolerances import TOL, TORCH_AGREEMENT

pytestmark = pytest.mark.distributed


class BatchNormNet(nn.Module):
    """distributed_test.py's BatchNormNet: Linear, a 3-D BatchNorm1d over (N, 4, 10), Linear."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 40, bias=False)
        self.bn = nn.BatchNorm1d(4, affine=affine)
        self.fc2 = nn.Linear(40, 4, bias=False)

    def forward(self, x):
        x = torch.reshape(self.fc1(x), (-1, 4, 10))
        x = torch.reshape(self.bn(x), (-1, 40))
        return F.softmax(self.fc2(x), dim=1)


def _step(model: nn.Module) -> None:
    """distributed_test.py's _model_step: p += p.grad, grads cleared."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p += p.grad
                p.grad = None


def _ddp_niter(base, ddp, x, target, local_bs, offset, global_bs, world, perms, save_at=None):
    """distributed_test.py's _test_DDP_niter: per iteration one step of the single-process model
    on the whole batch and one of the DDP model on this rank's slice (loss scaled by
    world·local/global), then both parameter lists. ``perms`` are the shuffles (the same on both
    ranks). Returns [(base params, ddp params)] per iteration."""
    out = []
    for it, perm in enumerate(perms):
        base.train()
        F.mse_loss(base(x), target).backward()
        ddp.train()
        sl = slice(offset, offset + local_bs)
        (F.mse_loss(ddp(x[sl]), target[sl]) * (world * local_bs / global_bs)).backward()
        _step(base)
        _step(ddp)
        out.append(
            ([p.detach().clone() for p in base.parameters()],
             [p.detach().clone() for p in ddp.module.parameters()])
        )  # fmt: skip
        x = x[perm]
        if it == save_at:  # torch saves and reloads the DDP model in the middle
            buffer = io.BytesIO()
            torch.save(ddp, buffer)
            buffer.seek(0)
            ddp = torch.load(buffer, weights_only=False)
    return out


def _case_ddp_syncbn(rank, world, inputs, affine, local_bs, offset, global_bs):
    model = BatchNormNet(affine).double()
    model.load_state_dict(inputs[f"net_affine={affine}"])
    base = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(
        SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    )
    x, target = inputs["x_net"][:global_bs], inputs["t_net"][:global_bs]
    perms = inputs["perms"][global_bs][: 5 if affine else 2]
    return _ddp_niter(base, ddp, x, target, local_bs, offset, global_bs, world, perms, save_at=2)


def _case_2d_input(rank, world, inputs, local_bs):
    model = nn.BatchNorm1d(2).double()
    base = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(batchnorm.convert_sync(copy.deepcopy(model)))
    global_bs = world * local_bs
    x, target = inputs["x_2d"][:global_bs], inputs["t_2d"][:global_bs]
    perms = inputs["perms"][global_bs][:5]
    return _ddp_niter(base, ddp, x, target, local_bs, rank * local_bs, global_bs, world, perms)


def _case_running_value(rank, world):
    """Diff_Input_Sizes_Running_Value: ranks hold 10·10^rank values per channel; after 100 steps
    with momentum 0.99 the running statistics are those of the union."""
    bn = SyncBatchNorm(2, momentum=0.99)
    ddp = nn.parallel.DistributedDataParallel(bn)
    parts = [
        torch.cat([torch.ones(2, 1, 10 ** (i + 1)) * 0.1 ** (i - 1),
                   torch.ones(2, 1, 10 ** (i + 1)) * 0.3 ** (i - 1)], dim=1)
        for i in range(world)
    ]  # fmt: skip
    for _ in range(100):
        ddp(parts[rank]).mean().backward()
    union = torch.cat([p.permute(1, 0, 2).reshape(2, -1) for p in parts], dim=1)
    return dict(
        running_mean=bn.running_mean.clone(),
        running_var=bn.running_var.clone(),
        mean=union.mean(1),
        var=union.var(1),
    )


def _case_half(dtype):
    """SyncBatchNorm_half: a 16-bit model converted and wrapped in DDP keeps its dtype through
    forward and backward (CPU: float16 and bfloat16)."""
    model = batchnorm.convert_sync(BatchNormNet().to(dtype))
    ddp = nn.parallel.DistributedDataParallel(model)
    out = ddp(torch.randn(2, 2, dtype=dtype))
    out.sum().backward()
    return dict(out=out.dtype, grads=sorted({str(p.grad.dtype) for p in model.parameters()}))


def _case_memory_format(rank, world, inputs, fmt):
    """SyncBatchNorm_Channels_Last: SyncBatchNorm(2, momentum=0.99) in DDP against the same layer
    given the whole batch, on channels_last(_3d) inputs; outputs keep the format."""
    layer = SyncBatchNorm(2, momentum=0.99, dtype=torch.float64)
    base = copy.deepcopy(layer)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(layer))
    memory_format = getattr(torch, fmt)
    x = inputs[fmt][0].to(memory_format=memory_format)
    target = inputs[fmt][1].to(memory_format=memory_format)
    kept = []
    out = []
    for perm in inputs["perms"][2 * world][:5]:
        y = base(x)
        F.mse_loss(y, target).backward()
        yd = ddp(x[rank * 2 : rank * 2 + 2])
        F.mse_loss(yd, target[rank * 2 : rank * 2 + 2]).backward()
        kept += [y.is_contiguous(memory_format=memory_format),
                 yd.is_contiguous(memory_format=memory_format)]  # fmt: skip
        _step(base)
        _step(ddp)
        out.append(([p.detach().clone() for p in base.parameters()],
                    [p.detach().clone() for p in ddp.module.parameters()]))  # fmt: skip
        x = x[perm]
    return dict(steps=out, kept=kept)


def _case_process_group():
    """SyncBatchNorm_process_group: convert_sync_batchnorm passes the group to nested layers."""
    group = dist.new_group([0])
    inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = nn.Sequential(nn.Sequential(inner, nn.BatchNorm2d(3)), nn.BatchNorm2d(3))
    synced = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model), group)
    layers = [m for m in synced.modules() if isinstance(m, SyncBatchNorm)]
    return dict(n=len(layers), same=all(m.process_group is group for m in layers))


def _case_ddp_inference_one_rank(rank, inputs):
    """Issue 18 item 3: a DDP model with track_running_stats=False SyncBN (no buffers in torch's
    layer) doing inference on one rank. DDP broadcasts the module's buffers at every forward; the
    extra nonfinite_skips buffer made rank 0 wait for rank 1 until the gloo timeout."""
    model = batchnorm.convert_sync(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    ).double()
    model.load_state_dict(inputs["inference_state"])
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True, the default
    ddp(inputs["x_inf"][rank * 4 : rank * 4 + 4]).sum().backward()  # a step together first
    ddp.eval()
    y = None
    if rank == 0:
        with torch.no_grad():
            y = ddp(inputs["x_inf"])  # alone: no collective may be waiting for rank 1
    return dict(y=y, buffers=[n for n, _ in ddp.named_buffers()], state=model.state_dict())


def _case_dtensor(world, inputs):
    """DTensor on a device mesh of all ranks: our layers and functional form against torch's,
    the module distributed with distribute_module, inputs Replicate or Shard(0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, placement in (("replicate", Replicate()), ("shard0", Shard(0))):
        got = {}
        for impl, cls in (("torch", nn.BatchNorm2d), ("ours", batchnorm.BatchNorm2d)):
            layer = cls(3, dtype=torch.float64)
            layer.load_state_dict(inputs["dtensor_state"])
            distribute_module(layer, mesh)
            x = distribute_tensor(inputs["x_dt"].clone(), mesh, [placement]).requires_grad_()
            y = layer(x)
            y.backward(distribute_tensor(inputs["g_dt"], mesh, [placement]))
            layer.eval()
            y_eval = layer(distribute_tensor(inputs["x_dt"], mesh, [placement]))
            got[impl] = dict(
                y=y.full_tensor(),
                dx=x.grad.full_tensor(),
                dw=layer.weight.grad.full_tensor(),
                db=layer.bias.grad.full_tensor(),
                buffers={k: v.full_tensor() for k, v in layer.named_buffers()},
                y_eval=y_eval.full_tensor(),
                placements=str(y.placements),
            )
        fn = {}
        for impl, f in (("torch", F.batch_norm), ("ours", batchnorm.functional.batch_norm)):
            x = distribute_tensor(inputs["x_dt"], mesh, [placement])
            rm, rv = (distribute_tensor(t.clone(), mesh, [Replicate()])
                      for t in (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)))  # fmt: skip
            fn[impl] = dict(y=f(x, rm, rv, training=True).full_tensor(), rm=rm.full_tensor())
        out[name] = dict(module=got, functional=fn)
    return out


def worker(rank: int, world_size: int, inputs: dict) -> dict:
    res = {}
    res["ddp_syncbn"] = _case_ddp_syncbn(rank, world_size, inputs, True, 2, rank * 2, 4)
    res["ddp_syncbn_no_affine"] = _case_ddp_syncbn(rank, world_size, inputs, False, 2, rank * 2, 4)
    local_bs, offset = rank + 2, (rank + 3) * rank // 2  # Diff_Input_Sizes_gradient
    res["diff_sizes_gradient"] = _case_ddp_syncbn(
        rank, world_size, inputs, True, local_bs, offset, (world_size + 3) * world_size // 2
    )
    res["2d_input"] = _case_2d_input(rank, world_size, inputs, 2)
    res["single_input_per_process"] = _case_2d_input(rank, world_size, inputs, 1)
    res["running_value"] = _case_running_value(rank, world_size)
    res["half"] = {str(dt): _case_half(dt) for dt in (torch.float16, torch.bfloat16)}
    res["channels_last"] = _case_memory_format(rank, world_size, inputs, "channels_last")
    res["channels_last_3d"] = _case_memory_format(rank, world_size, inputs, "channels_last_3d")
    res["process_group"] = _case_process_group()
    res["dtensor"] = _case_dtensor(world_size, inputs)
    res["inference_one_rank"] = _case_ddp_inference_one_rank(rank, inputs)  # last: rank 1 leaves
    return res


def dtensor_worker(rank: int, world_size: int, inputs: dict) -> dict:
    return _case_dtensor(world_size, inputs)


def _inputs() -> dict:
    torch.manual_seed(0)
    dt = torch.float64
    inputs = {f"net_affine={a}": BatchNormNet(a).double().state_dict() for a in (True, False)}
    inputs |= dict(
        x_net=torch.randn(5, 2, dtype=dt),
        t_net=torch.randn(5, 4, dtype=dt),
        x_2d=torch.randn(4, 2, dtype=dt),
        t_2d=torch.randn(4, 2, dtype=dt),
        perms={n: [torch.randperm(n) for _ in range(5)] for n in (2, 4, 5)},
        channels_last=(torch.randn(4, 2, 4, 4, dtype=dt), torch.randn(4, 2, 4, 4, dtype=dt)),
        channels_last_3d=(
            torch.randn(4, 2, 4, 4, 4, dtype=dt),
            torch.randn(4, 2, 4, 4, 4, dtype=dt),
        ),
        x_inf=torch.randn(8, 3, dtype=dt),
        x_dt=torch.randn(4, 3, 2, 2, dtype=dt) * 2 + 1,
        g_dt=torch.randn(4, 3, 2, 2, dtype=dt),
    )
    inf = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    inputs["inference_state"] = inf.state_dict()
    bn = nn.BatchNorm2d(3, dtype=dt)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    inputs["dtensor_state"] = bn.state_dict()
    return inputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    inputs = _inputs()
    return inputs, spawn(worker, 2, inputs, tmp_path_factory.mktemp("torch_cases"))


def _assert_steps_equal(steps, tol=TOL[torch.float64]):
    assert steps
    for base, ddp in steps:
        assert len(base) == len(ddp)
        for a, b in zip(base, ddp, strict=True):
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize(
    "case",
    [
        "ddp_syncbn",
        "ddp_syncbn_no_affine",
        "diff_sizes_gradient",
        "2d_input",
        "single_input_per_process",
    ],
)
def test_ddp_syncbn_matches_one_process_like_torchs_tests(runs, case):
    _, results = runs
    for r in results:
        _assert_steps_equal(r[case])


def test_running_value_with_different_input_sizes(runs):
    _, results = runs
    for r in results:
        v = r["running_value"]
        torch.testing.assert_close(v["running_mean"], v["mean"])  # torch's own tolerances
        torch.testing.assert_close(v["running_var"], v["var"])


def test_16_bit_models_keep_their_dtype(runs):
    _, results = runs
    for r in results:
        for dtype, got in r["half"].items():
            assert str(got["out"]) == dtype and got["grads"] == [dtype]


@pytest.mark.parametrize("fmt", ["channels_last", "channels_last_3d"])
def test_memory_formats_match_and_are_kept(runs, fmt):
    _, results = runs
    for r in results:
        _assert_steps_equal(r[fmt]["steps"])
        assert all(r[fmt]["kept"])


def test_convert_passes_the_process_group_to_nested_layers(runs):
    _, results = runs
    for r in results:
        assert r["process_group"] == dict(n=3, same=True)


def test_ddp_inference_on_one_rank_without_running_stats_does_not_hang(runs):
    inputs, results = runs
    got = results[0]["inference_one_rank"]
    assert got["buffers"] == [] and results[1]["inference_one_rank"]["y"] is None
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    ref.load_state_dict(got["state"])  # (no optimizer step was taken: these are the start weights)
    ref.eval()
    with torch.no_grad():  # without running statistics torch normalizes with the batch's in eval
        torch.testing.assert_close(got["y"], ref(inputs["x_inf"]), **TOL[torch.float64])


def _check_dtensor(result):
    for name, got in result.items():
        mod = got["module"]
        for key in ("y", "dx", "dw", "db", "y_eval"):
            torch.testing.assert_close(mod["ours"][key], mod["torch"][key], **TORCH_AGREEMENT)
        assert mod["ours"]["placements"] == mod["torch"]["placements"], name
        assert mod["ours"]["buffers"].keys() == mod["torch"]["buffers"].keys()
        for key, value in mod["torch"]["buffers"].items():
            torch.testing.assert_close(mod["ours"]["buffers"][key], value, **TORCH_AGREEMENT)
        fn = got["functional"]
        torch.testing.assert_close(fn["ours"]["y"], fn["torch"]["y"], **TORCH_AGREEMENT)
        torch.testing.assert_close(fn["ours"]["rm"], fn["torch"]["rm"], **TORCH_AGREEMENT)


def test_dtensor_on_a_two_process_mesh_matches_torch(runs):
    """Issue 18 item 4: DTensor inputs and parameters reached the fused kernel ("data is not
    allocated"); they now take PyTorch's own path, with torch's results and placements."""
    _, results = runs
    for r in results:
        _check_dtensor(r["dtensor"])


def test_dtensor_on_a_one_process_mesh_matches_torch(tmp_path):
    inputs = _inputs()
    (result,) = spawn(dtensor_worker, 1, inputs, tmp_path)
    _check_dtensor(result)
