"""diagnose: per-layer BN health, checked on models with known problems planted in them."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import diagnose


def _model(bn=batchnorm.BatchNorm2d):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        bn(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, bias=False),
        bn(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5, bias=False),
        batchnorm.BatchNorm1d(5),
    )


def _data(n=12):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=gen) * 2 + 1 for _ in range(n)]


def _calibrated(bn=batchnorm.BatchNorm2d):
    model = _model(bn)
    batchnorm.recalibrate(model, _data(), "pooled")
    return model.eval()


@pytest.mark.parametrize("bn", [batchnorm.BatchNorm2d, nn.BatchNorm2d], ids=["ours", "torch"])
def test_calibrated_model_is_healthy_and_nothing_changes(bn):
    model = _calibrated(bn)
    model.train()
    state = copy.deepcopy(model.state_dict())
    report = diagnose(model, _data(), num_batches=None)
    assert report.healthy, str(report)
    # The first BN sees exactly the batches it was calibrated on; deeper layers see activations
    # computed with eval-mode statistics upstream (recalibrate ran them in train mode).
    assert report["1"].mean_shift < 1e-6 and report["1"].std_ratio < 1 + 1e-6  # float32 buffers
    assert all(layer.mean_shift < 0.05 and layer.std_ratio < 1.1 for layer in report.layers)
    assert report["1"].samples == 12 * 16 * 6 * 6
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_stale_statistics_are_found_and_recalibrate_fixes_them():
    model = _calibrated()
    with torch.no_grad():
        model[4].running_mean[2] += 3 * model[4].running_var[2].sqrt()  # three std off
    report = diagnose(model, _data())
    layer = report["4"]
    assert layer.stale and layer.worst_channel == 2 and 2.5 < layer.mean_shift < 3.5
    assert not report["1"].stale  # the layer above is untouched
    assert not report.healthy and any("recalibrate" in tip for tip in report.advice())
    assert "stale statistics" in str(report)
    batchnorm.recalibrate(model, _data(), "pooled")
    assert diagnose(model, _data()).healthy


def test_a_shrunken_running_variance_is_a_scale_problem():
    model = _calibrated()
    with torch.no_grad():
        model[1].running_var.mul_(0.25)  # std off by 2x
    layer = diagnose(model, _data())["1"]
    assert layer.stale and 1.9 < layer.std_ratio < 2.1


def test_dead_channels_and_collapsed_gamma():
    model = _calibrated()
    with torch.no_grad():
        model[0].weight[3].zero_()  # channel 3 of the first BN now sees a constant 0
        model[4].weight[1] = 0.0  # gamma of channel 1 of the second BN collapsed
    batchnorm.recalibrate(model, _data(), "pooled")
    report = diagnose(model, _data())
    assert report["1"].dead == (3,)
    assert report["4"].collapsed == (1,)
    assert not report["1"].stale  # a dead channel does not count as stale
    assert "dead channel" in str(report) and "γ ≈ 0" in str(report)


def test_nonfinite_state_and_guard_skips_are_reported():
    model = _calibrated()
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    model[8].nonfinite_skips.fill_(3)
    report = diagnose(model, _data())
    assert report["1"].nonfinite == ("running_var",)
    assert report["8"].skipped_steps == 3
    assert any("non-finite" in tip for tip in report.advice())


def test_errors_and_restoration_on_failure():
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        diagnose(nn.Linear(2, 2), [torch.randn(3, 2)])
    model = _calibrated()
    with pytest.raises(ValueError, match="empty"):
        diagnose(model, [])
    model.train()

    def broken():
        yield torch.randn(4, 3, 8, 8)
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        diagnose(model, broken())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_the_batch_limit_is_applied_and_said():
    model = _calibrated()
    capped = diagnose(model, _data(12))  # the default: the first 10 batches
    assert capped.batches == 10 and capped["1"].samples == 10 * 16 * 6 * 6
    assert "over 10 batch(es) (the first 10: num_batches=10; num_batches=None uses all)" in str(
        capped
    )
    whole = diagnose(model, _data(4))  # fewer than the limit: all of them, no note
    assert whole.batches == 4 and "the first" not in str(whole)
    assert diagnose(model, _data(12), num_batches=None).batches == 12
