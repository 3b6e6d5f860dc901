"""Masked BN: statistics over the valid positions only; padding changes nothing that matters."""

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.nn import GhostBatchNorm1d
from tests.tolerances import TOL, TORCH_AGREEMENT


def _padded(lengths, channels=3, width=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), channels, width, generator=gen, dtype=torch.float64) * 2 + 1
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[:, None, :], 1e3)  # loud padding: it must not matter
    return x, mask


def _packed(x, mask):
    """The valid positions as a (m, C) batch."""
    return x.transpose(1, 2)[mask]


def test_valid_outputs_and_statistics_are_bn_of_the_valid_values():
    x, mask = _padded([7, 3, 5, 1])
    layer = BatchNorm1d(3, dtype=torch.float64)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        for m in (layer, ref):
            m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    xs = x.clone().requires_grad_()
    y = layer(xs, mask=mask)
    packed = _packed(x, mask).clone().requires_grad_()
    y_ref = ref(packed)
    torch.testing.assert_close(_packed(y, mask), y_ref, **TOL[torch.float64])
    torch.testing.assert_close(layer.running_mean, ref.running_mean, **TOL[torch.float64])
    torch.testing.assert_close(layer.running_var, ref.running_var, **TOL[torch.float64])
    # padded outputs are masked downstream (zero gradient), as a sequence loss does; otherwise
    # their gradients would rightly flow into the valid inputs through the statistics
    g = torch.randn_like(y) * mask[:, None, :]
    y.backward(g)
    y_ref.backward(_packed(g, mask))
    torch.testing.assert_close(_packed(xs.grad, mask), packed.grad, **TOL[torch.float64])
    # a padded input gets only its direct path γ/σ_B · g, here 0: it does not touch the statistics
    padded = ~mask[:, None, :].expand_as(x)
    assert torch.equal(xs.grad[padded], torch.zeros(int(padded.sum()), dtype=torch.float64))


def test_padding_values_do_not_change_valid_outputs_or_statistics():
    x, mask = _padded([6, 2, 4], seed=1)
    other = x.masked_fill(~mask[:, None, :], -7.0)
    a, b = BatchNorm1d(3, dtype=torch.float64), BatchNorm1d(3, dtype=torch.float64)
    ya, yb = a(x, mask=mask), b(other, mask=mask)
    torch.testing.assert_close(_packed(ya, mask), _packed(yb, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)
    plain = BatchNorm1d(3, dtype=torch.float64)
    plain(x)  # without the mask the padding pollutes the statistics
    assert plain.running_mean.max() > 10  # one EMA step (0.1) towards a mean of ~430


def test_2d_mask_eval_and_errors():
    x = torch.randn(2, 4, 3, 3)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    layer = BatchNorm2d(4)
    torch.testing.assert_close(layer(x, mask=mask), BatchNorm2d(4)(x), **TORCH_AGREEMENT)
    layer.eval()
    torch.testing.assert_close(layer(x, mask=mask), layer(x))  # inference ignores the mask
    layer.train()
    with pytest.raises(ValueError, match=r"mask must have the input's shape .*\(2, 3, 3\)"):
        layer(x, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        layer(x, mask=torch.ones(2, 3, 3))
    one = torch.zeros(2, 3, 3, dtype=torch.bool)
    one[0, 0, 0] = True
    with pytest.raises(ValueError, match="more than 1 valid value"):
        layer(x, mask=one)
    with pytest.raises(NotImplementedError, match="does not take a mask"):
        GhostBatchNorm1d(4, virtual_batch_size=2)(torch.randn(4, 4), mask=torch.ones(4).bool())
