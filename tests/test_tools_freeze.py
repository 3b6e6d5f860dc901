"""freeze_stats / unfreeze_stats (statistics fixed, γ/β train) and freeze (FrozenBatchNorm)."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    freeze_stats,
    unfreeze_stats,
)
from tests.test_tools_fold import randomize_bn


def _net(ours: bool) -> nn.Module:
    bn = batchnorm.BatchNorm2d if ours else nn.BatchNorm2d
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
        )
    )


@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_freeze_stats_trains_gamma_beta_but_not_the_statistics(ours):
    model = _net(ours)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before freeze_stats: still valid
    weight = model[1].weight
    stats = {k: v.clone() for k, v in model[1].state_dict().items() if "running" in k}
    assert freeze_stats(model) is model
    assert isinstance(model[1], batchnorm.BatchNorm2d) and model[1].weight is weight
    reference = copy.deepcopy(model).eval()
    model.eval().train()  # model.train() does not undo it
    x = torch.randn(8, 3, 6, 6, requires_grad=True)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)  # = the eval function
    before = weight.detach().clone()
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(weight, before)  # γ trained, through the optimizer built earlier
    assert x.grad is not None and x.grad.abs().sum() > 0
    for k, v in stats.items():
        assert torch.equal(getattr(model[1], k), v), k
    assert int(model[1].num_batches_tracked) == 0
    unfreeze_stats(model)
    model(x)
    assert not torch.equal(model[1].running_mean, stats["running_mean"])


def test_freeze_stats_refuses_what_it_cannot_freeze_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(3))
    with pytest.raises(TypeError, match=r"SyncBatchNorm\(3\) '1'.*has no frozen-statistics mode"):
        freeze_stats(model)
    assert type(model[0]) is nn.BatchNorm1d  # nothing was converted
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\) '0' has no running statistics"):
        freeze_stats(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_frozen_layers_compute_eval_bn_in_every_mode(dims, ours):
    torch_cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    our_cls = (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d)[dims - 1]
    bn = randomize_bn((our_cls if ours else torch_cls)(5, eps=1e-3)).train()
    frozen = freeze(bn)
    assert type(frozen) is (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)[dims - 1]
    assert bn.training and type(bn) is (our_cls if ours else torch_cls)  # not mutated
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(4, 5, *[3] * dims, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    bn.eval()
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)
    g = torch.randn_like(x)
    frozen(x).backward(g)
    bn(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    # a BN checkpoint loads strictly (num_batches_tracked is dropped)
    fresh = type(frozen)(5, eps=1e-3)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), bn(x), rtol=0, atol=0)


def test_freeze_whole_models_and_errors():
    model = nn.Sequential(
        _net(False),
        nn.Flatten(),
        nn.BatchNorm1d(2, affine=False),
        nn.SyncBatchNorm(2),
    )
    randomize_bn(model)
    model.eval()
    frozen = freeze(model)
    kinds = [type(m) for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]
    assert kinds == [FrozenBatchNorm2d, FrozenBatchNorm1d, FrozenBatchNorm]
    assert frozen[0][1].layer_name == "0.1"
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(frozen.train()(x), model(x), rtol=0, atol=0)
    assert freeze(model, inplace=True) is model and isinstance(model[2], FrozenBatchNorm1d)
    with pytest.raises(ValueError, match=r"freeze: BatchNorm1d\(2\) '1' has no running statistics"):
        freeze(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(2, track_running_stats=False)))
    bad = freeze(nn.Sequential(nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\) '0'.*\(N, C, H, W\).*\(2, 3\)"):
        bad(torch.randn(2, 3))


def test_convert_in_place_keeps_the_parameter_objects():
    """So an optimizer built before the conversion keeps training the converted layers."""
    model = _net(False)
    weight, mean = model[1].weight, model[1].running_mean
    assert batchnorm.convert(model, inplace=True) is model
    assert type(model[1]) is batchnorm.BatchNorm2d
    assert model[1].weight is weight and model[1].running_mean is mean
    copied = batchnorm.convert(model, to="torch")
    assert type(copied[1]) is nn.BatchNorm2d and copied[1].weight is not weight
