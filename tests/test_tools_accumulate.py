"""accumulate_statistics: one running-statistics update per effective batch."""

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import accumulate_statistics
from tests.tolerances import TORCH_AGREEMENT

LAYERS = [
    (batchnorm.BatchNorm2d, {}),
    (batchnorm.BatchNorm2d, {"momentum": None}),
    (nn.BatchNorm2d, {}),
    (nn.BatchNorm2d, {"momentum": None}),
]
IDS = ["ours-ema", "ours-cumulative", "torch-ema", "torch-cumulative"]


@pytest.mark.parametrize(("cls", "kw"), LAYERS, ids=IDS)
def test_micro_batches_update_like_the_effective_batch(cls, kw):
    """k micro-batches inside the block leave the running statistics of one update with the
    whole batch, as torch's layer records it for that batch."""
    torch.manual_seed(0)
    layer, reference = cls(3, **kw), nn.BatchNorm2d(3, **kw)
    for step in range(3):  # several optimizer steps: the EMA and the cumulative count advance
        batch = torch.randn(24, 3, 5, 5) * (step + 1) + step
        with accumulate_statistics(layer):
            for micro in batch.split([5, 11, 8]):  # uneven micro-batches
                layer(micro)
        reference(batch)
        torch.testing.assert_close(layer.running_mean, reference.running_mean, **TORCH_AGREEMENT)
        torch.testing.assert_close(layer.running_var, reference.running_var, **TORCH_AGREEMENT)
        assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1


def test_without_the_block_each_micro_batch_updates():
    """The problem the block solves: k updates with micro-batch statistics differ from one."""
    torch.manual_seed(0)
    layer, reference = batchnorm.BatchNorm1d(4), nn.BatchNorm1d(4)
    batch = torch.randn(32, 4) * 3 + torch.arange(32.0)[:, None] / 8
    for micro in batch.split(8):
        layer(micro)
    reference(batch)
    assert int(layer.num_batches_tracked) == 4
    assert (layer.running_mean - reference.running_mean).abs().max() > 0.05


def test_population_mode_records_the_effective_batch_once():
    layer = batchnorm.BatchNorm1d(2, stats_mode="population")
    batch = torch.randn(20, 2, dtype=torch.float64) + 5
    layer = layer.double()
    with accumulate_statistics(layer):
        for micro in batch.split(5):
            layer(micro)
    assert layer.population.batches == 1 and layer.population.samples == 20
    torch.testing.assert_close(layer.running_mean, batch.mean(0))
    torch.testing.assert_close(layer.running_var, batch.var(0))


def test_outputs_are_unchanged_and_an_exception_drops_everything():
    torch.manual_seed(0)
    layer, plain = batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    x = torch.randn(6, 3, 4, 4)
    with accumulate_statistics(layer):
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)  # normalization as usual
    before = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"), accumulate_statistics(layer):
        layer(torch.randn(6, 3, 4, 4) + 10)
        raise RuntimeError("boom")
    assert torch.equal(layer.running_mean, before) and layer._deferred is None
    torch_layer = nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError), accumulate_statistics(torch_layer):
        torch_layer(x)
        raise RuntimeError("boom")
    assert torch_layer.track_running_stats and not torch_layer._forward_pre_hooks
    assert torch.equal(torch_layer.running_mean, torch.zeros(3))


def test_nested_blocks_and_nonfinite_micro_batches():
    layer = batchnorm.BatchNorm1d(2)
    with (
        accumulate_statistics(layer),
        pytest.raises(RuntimeError, match="already inside"),
        accumulate_statistics(layer),
    ):
        pass
    bad = torch.randn(4, 2)
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="not finite"), accumulate_statistics(layer):
        layer(torch.randn(4, 2))
        layer(bad)  # skipped (counted) — the finite micro-batch still counts
    assert int(layer.nonfinite_skips) == 1 and int(layer.num_batches_tracked) == 1
    assert torch.isfinite(layer.running_mean).all()


def test_a_model_with_gradient_accumulation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=False), batchnorm.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        with accumulate_statistics(model):
            for micro in torch.randn(32, 5).split(8):
                (model(micro).square().mean() / 4).backward()
        opt.step()
        opt.zero_grad()
    assert int(model[1].num_batches_tracked) == 2
