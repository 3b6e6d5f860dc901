"""Ghost BN: each ghost batch normalized alone; one running-statistics update per step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from tests.tolerances import TOL, TORCH_AGREEMENT


def test_each_ghost_batch_is_normalized_alone(backend):
    layer = GhostBatchNorm2d(3, virtual_batch_size=4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64, requires_grad=True)  # ghosts of 4, 4, 2
    g = torch.randn_like(x)
    y = layer(x)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y2 = torch.cat([F.batch_norm(c, None, None, w2, b2, True) for c in x2.split(4)])
    y2.backward(g)
    torch.testing.assert_close(y, y2, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.weight.grad, w2.grad, **TOL[torch.float64])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_see_the_whole_batch_once(momentum):
    layer = GhostBatchNorm1d(4, virtual_batch_size=8, momentum=momentum)
    ref = nn.BatchNorm1d(4, momentum=momentum)
    for step in range(3):
        x = torch.randn(32, 4) * (step + 1) + step
        layer(x)
        ref(x)  # torch's layer fed the whole batch: one update with its statistics
    torch.testing.assert_close(layer.running_mean, ref.running_mean, **TORCH_AGREEMENT)
    torch.testing.assert_close(layer.running_var, ref.running_var, **TORCH_AGREEMENT)
    assert int(layer.num_batches_tracked) == 3


def test_inference_and_small_batches_are_plain_batch_norm():
    torch.manual_seed(0)
    layer = GhostBatchNorm3d(2, virtual_batch_size=4)
    plain = nn.BatchNorm3d(2)
    x = torch.randn(3, 2, 3, 3, 3)  # no larger than a ghost batch: one BN batch
    torch.testing.assert_close(layer(x), plain(x), **TORCH_AGREEMENT)
    layer.eval()
    plain.load_state_dict(layer.state_dict())
    plain.eval()
    big = torch.randn(16, 2, 3, 3, 3)  # no ghost batching at inference (keras#15790)
    torch.testing.assert_close(layer(big), plain(big), **TORCH_AGREEMENT)
    assert "virtual_batch_size=4" in repr(layer)


def test_bad_settings_and_a_last_ghost_of_one():
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        GhostBatchNorm1d(3, virtual_batch_size=0)
    layer = GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"last ghost batch .* holds 1 example"):
        layer(torch.randn(9, 3))
    layer(torch.randn(9, 3, 2))  # (N, C, L): a ghost of one example still has 2 values
