"""SyncBatchNorm in one process: the fallback, checkpoints, errors, the merge, convert_sync.

The synchronized path itself runs on real process groups in test_sync_distributed.py.
"""

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from batchnorm.functional import Moments
from batchnorm.nn.sync import _local_moments, _merge_in_rank_order
from batchnorm.tools import convert_from_sync, convert_sync
from tests.tolerances import F64_OFFSET_1E6, TOL

SHAPES = [
    ((8, 4), None, BatchNorm1d),
    ((6, 4, 5), None, BatchNorm1d),
    ((4, 4, 3, 5), None, BatchNorm2d),
    ((4, 4, 3, 5), torch.channels_last, BatchNorm2d),
    ((2, 4, 3, 2, 5), torch.channels_last_3d, BatchNorm3d),
]
SHAPE_IDS = ["NC", "NCL", "NCHW", "NHWC", "NDHWC"]


@pytest.mark.parametrize(("shape", "fmt", "plain_cls"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_the_plain_layer(backend, shape, fmt, plain_cls, momentum):
    assert not torch.distributed.is_initialized()
    sync, plain = SyncBatchNorm(4, momentum=momentum), plain_cls(4, momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    sync.load_state_dict(plain.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        x = x.contiguous(memory_format=fmt) if fmt else x
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape)
        ys, yp = sync(xs), plain(xp)
        ys.backward(g)
        yp.backward(g)
        assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
    assert torch.equal(sync.weight.grad, plain.weight.grad)
    for (name, a), b in zip(sync.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sync.eval()
    plain.eval()
    assert torch.equal(sync(x), plain(x))


def test_state_dicts_load_strictly_into_torch_layers_and_back():
    ours = SyncBatchNorm(6, momentum=None)
    ours(torch.randn(5, 6, 3) * 2 + 1)
    for other in (nn.SyncBatchNorm(6), nn.BatchNorm1d(6), nn.BatchNorm2d(6), BatchNorm3d(6)):
        other.load_state_dict(ours.state_dict(), strict=True)
        back = SyncBatchNorm(6)
        back.load_state_dict(other.state_dict(), strict=True)
        for (name, a), b in zip(back.state_dict().items(), ours.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_constructor_matches_torch_sync_batchnorm():
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    assert list(ours)[: len(theirs)] == list(theirs)
    layer = SyncBatchNorm(3, 1e-3, 0.2, True, True, None, "cpu", torch.float64, bias=False)
    assert layer.eps == 1e-3 and layer.momentum == 0.2 and layer.process_group is None
    assert layer.weight.dtype == torch.float64 and layer.bias is None


def test_bad_inputs_name_the_layer_and_the_shape():
    model = batchnorm.convert_sync(nn.Sequential(nn.Identity(), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\) '1'.*2-D or 3-D.*shape \(4,\)"):
        model(torch.randn(4))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\) '1'.*shape \(2, 4, 1, 1, 1, 1\)"):
        model(torch.randn(2, 4, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\) '1'.*4 channels.*\(2, 3, 5\)"):
        model(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match=r"SyncBatchNorm\(4\) '1'.*floating-point"):
        model(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\) '1'.*more than 1 value.*\(1, 4\)"):
        model(torch.randn(1, 4))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_merging_every_ranks_moments_gives_those_of_the_whole_batch(ranks, offset):
    """The forward's merge, given what all_gather returns: one (count, mean, M2) row per rank."""
    x = torch.randn(23, 3, 4, dtype=torch.float64) * 2 + offset
    sizes = torch.multinomial(torch.ones(ranks), 23, replacement=True).bincount(minlength=ranks)
    sizes[0] = 0 if ranks > 1 else sizes[0]  # always one empty rank
    sizes[-1] += 23 - int(sizes.sum())
    parts = torch.stack([_local_moments(p) for p in x.split(sizes.tolist())])
    merged = _merge_in_rank_order(Moments(parts[:, 0], parts[:, 1], parts[:, 2]))
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
    tol = F64_OFFSET_1E6 if offset else TOL[torch.float64]
    assert torch.equal(merged.count, torch.full((3,), 92.0, dtype=torch.float64))
    torch.testing.assert_close(merged.mean, mean, **tol)
    torch.testing.assert_close(merged.var, var, **tol)


def _torch_model() -> nn.Module:
    shared = nn.BatchNorm1d(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(2),
        nn.Sequential(nn.Conv1d(4, 5, 1), shared, nn.ReLU(), shared),
        nn.Unflatten(2, (2, 3, 3)),
        nn.Conv3d(5, 2, 1),
        nn.BatchNorm3d(2, momentum=None, affine=False),
    )


def test_convert_sync_and_back_keep_the_model():
    model = _torch_model()
    model(torch.randn(4, 3, 2, 9))  # give the running statistics values
    model[1].weight.requires_grad_(False)
    model[3].eval()
    synced = convert_sync(model)
    layers = [m for m in synced.modules() if isinstance(m, SyncBatchNorm)]
    assert len(layers) == 3  # the shared layer stays one layer
    assert synced[3][1] is synced[3][3]
    assert [m.layer_name for m in layers] == ["1", "3.1", "6"]
    assert synced.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(synced.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not synced[1].weight.requires_grad and synced[3][1].weight.requires_grad
    assert [m.training for m in synced.modules()] == [m.training for m in model.modules()]
    assert type(model[1]) is nn.BatchNorm2d  # the original is untouched (a copy was converted)
    x = torch.randn(4, 3, 2, 9)
    torch.testing.assert_close(synced(x), model(x), **TOL[torch.float32])  # one process: plain BN
    torch.testing.assert_close(synced.state_dict(), model.state_dict(), **TOL[torch.float32])

    back = convert_from_sync(synced)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert back[3][1] is back[3][3]
    for (name, a), b in zip(back.state_dict().items(), synced.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not back[1].weight.requires_grad
    assert [m.training for m in back.modules()] == [m.training for m in model.modules()]


def test_conversion_keeps_our_layers_settings():
    bn = BatchNorm2d(3, stats_mode="population", guard_nonfinite=False)
    bn(torch.randn(4, 3, 2, 2))
    bn.freeze_stats = True
    synced = convert_sync(bn)
    assert isinstance(synced, SyncBatchNorm) and synced.plain_class is BatchNorm2d
    assert synced.stats_mode == "population" and synced.population.batches == 1
    assert synced.freeze_stats and not synced.guard_nonfinite
    back = convert_from_sync(synced)
    assert type(back) is BatchNorm2d and back.stats_mode == "population"
    assert back.population.samples == 16 and back.freeze_stats and not back.guard_nonfinite


def test_convert_from_sync_of_a_layer_built_as_sync():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), SyncBatchNorm(3))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\).*has not seen an input"):
        convert_from_sync(model)
    model(torch.randn(2, 3, 2, 2))
    back = convert_from_sync(model)
    assert type(back[1]) is BatchNorm2d and type(model[1]) is SyncBatchNorm  # a copy


def test_convert_sync_in_place_and_torch_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3))
    same = SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert same is model and type(model[1]) is SyncBatchNorm
    assert model[1].plain_class is nn.SyncBatchNorm
    assert type(convert_from_sync(model)[1]) is nn.SyncBatchNorm
    lazy = nn.Sequential(nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="convert_sync: lazy layer '0'"):
        convert_sync(lazy)


def test_in_place_conversion_keeps_the_optimizers_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weight, running_mean = model[1].weight, model[1].running_mean
    convert_sync(model, inplace=True)
    assert model[1].weight is weight and model[1].running_mean is running_mean
    before = weight.detach().clone()
    model(torch.randn(8, 3)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)
    assert not torch.equal(running_mean, torch.zeros(4))


def test_pickle_and_deepcopy():
    layer = SyncBatchNorm(3)
    layer(torch.randn(4, 3))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is SyncBatchNorm and clone.last_input_dim == 2
        assert torch.equal(clone.running_mean, layer.running_mean)
