"""Batch Renorm against a float64 reference written from the paper's equations."""

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm2d
from batchnorm.functional import reference
from batchnorm.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from tests.tolerances import TOL, TORCH_AGREEMENT


def renorm_reference(x, w, b, running_mean, running_var, eps, r_max, d_max):
    """Ioffe 2017, Alg. 1, in float64 with plain autograd; r and d detached."""
    dims = reference.reduce_dims(x)
    shape = (1, -1, *[1] * (x.dim() - 2))
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, correction=0) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape)
    return w.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + b.reshape(shape)


@pytest.mark.parametrize("r_max, d_max", [(3.0, 5.0), (1.2, 0.1)])
def test_matches_the_reference_in_float64(backend, r_max, d_max):
    layer = BatchRenorm2d(3, r_max=r_max, d_max=d_max, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
        layer.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    y = layer(x)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y2 = renorm_reference(x2, w2, b2, rm, rv, layer.eps, r_max, d_max)
    y2.backward(g)
    torch.testing.assert_close(y, y2, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.weight.grad, w2.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.bias.grad, b2.grad, **TOL[torch.float64])
    # running statistics are BN's, from the batch statistics
    m = 6 * 16
    torch.testing.assert_close(layer.running_mean, 0.9 * rm + 0.1 * x.detach().mean((0, 2, 3)))
    var_u = x.detach().var((0, 2, 3), correction=1)
    torch.testing.assert_close(layer.running_var, 0.9 * rv + 0.1 * var_u)
    assert m == 96


def test_bounds_clip_hard_cases():
    layer = BatchRenorm1d(2, r_max=2.0, d_max=1.0, dtype=torch.float64, affine=False)
    x = torch.cat([torch.randn(50, 1) * 10 + 100, torch.randn(50, 1) * 0.01], 1).double()
    y = layer(x)  # running stats (0, 1): channel 0 is 10 sd away and 10x wider, channel 1 tiny
    x_hat = (x - x.mean(0)) / torch.sqrt(x.var(0, correction=0) + 1e-5)
    torch.testing.assert_close(y[:, 0], x_hat[:, 0] * 2.0 + 1.0)  # r = r_max, d = d_max
    torch.testing.assert_close(y[:, 1], x_hat[:, 1] * 0.5 + x[:, 1].mean().clamp(-1, 1))


def test_no_correction_is_batch_norm_and_warmup_is_batch_norm():
    torch.manual_seed(0)
    for renorm in (BatchRenorm2d(4, r_max=1.0, d_max=0.0), BatchRenorm2d(4, warmup=3)):
        bn = BatchNorm2d(4)
        for step in range(3):
            x = torch.randn(5, 4, 3, 3) * (step + 2) + step
            torch.testing.assert_close(renorm(x), bn(x), rtol=0, atol=0)
        torch.testing.assert_close(renorm.running_var, bn.running_var, rtol=0, atol=0)
    x = torch.randn(5, 4, 3, 3) * 5 + 7  # after the warmup the corrections apply
    assert (renorm(x) - bn(x)).abs().max() > 0.1


def test_eval_and_checkpoints_are_batch_norm():
    layer = BatchRenorm3d(2)
    for _ in range(3):
        layer(torch.randn(4, 2, 3, 3, 3) + 1)
    ref = nn.BatchNorm3d(2)
    ref.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    ref.eval()
    x = torch.randn(2, 2, 3, 3, 3)
    torch.testing.assert_close(layer(x), ref(x), **TORCH_AGREEMENT)
    assert "r_max=3.0, d_max=5.0, warmup=0" in repr(layer)


def test_bad_settings():
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max >= 1"):
        BatchRenorm2d(3, r_max=0.5)
    layer = BatchRenorm1d(3)
    layer.d_max = -1.0
    with pytest.raises(ValueError, match="d_max >= 0"):
        layer(torch.randn(4, 3))


# -- ghost batches (virtual_batch_size) -----------------------------------------------------------


def _ghost_layer(cls, r_max, d_max, **kw):
    layer = cls(3, r_max=r_max, d_max=d_max, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
        layer.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return layer


# (10, 10): no r or d clipped on this data (r in [0.2, 5.5], |d| < 5.6); (3, 5): some r clipped;
# (1.2, 0.1): nearly every r and d clipped.
@pytest.mark.parametrize("r_max, d_max", [(10.0, 10.0), (3.0, 5.0), (1.2, 0.1)])
@pytest.mark.parametrize(("cls", "shape", "size"), [
    (BatchRenorm1d, (12, 3), 4), (BatchRenorm1d, (10, 3), 4), (BatchRenorm2d, (10, 3, 3, 2), 4),
])  # fmt: skip
def test_ghost_batches_each_renormalized_and_one_running_update(cls, shape, size, r_max, d_max):
    layer = _ghost_layer(cls, r_max, d_max, virtual_batch_size=size)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y2 = torch.cat([
        renorm_reference(c, w2, b2, rm, rv, layer.eps, r_max, d_max) for c in x2.split(size)
    ])  # fmt: skip
    y2.backward(g)
    torch.testing.assert_close(y, y2, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.weight.grad, w2.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.bias.grad, b2.grad, **TOL[torch.float64])
    dims = [0, *range(2, len(shape))]
    whole = x.detach()
    torch.testing.assert_close(layer.running_mean, 0.9 * rm + 0.1 * whole.mean(dims))
    torch.testing.assert_close(layer.running_var, 0.9 * rv + 0.1 * whole.var(dims, correction=1))
    assert int(layer.num_batches_tracked) == 1  # one step, one update
    # against plain renorm over the whole batch: unclipped, both forwards are the running-statistics
    # normalization (r and d undo the batch's own), so only the gradients can tell a ghost batch
    # from the batch; clipped, the outputs differ too
    x3 = x.detach().clone().requires_grad_()
    y3 = _ghost_layer(cls, r_max, d_max)(x3)
    y3.backward(g)
    assert not torch.allclose(x.grad, x3.grad)
    assert torch.allclose(y.detach(), y3.detach()) == (r_max == 10.0)


def test_ghost_batches_no_smaller_than_the_batch_are_plain_renorm():
    x = torch.randn(8, 3, dtype=torch.float64) * 3
    for size in (8, 100):
        a, b = (
            _ghost_layer(BatchRenorm1d, 3.0, 5.0, virtual_batch_size=size),
            _ghost_layer(BatchRenorm1d, 3.0, 5.0),
        )
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)


def test_ghost_renorm_in_its_warmup_is_ghost_bn_and_eval_ignores_the_ghosts():
    from batchnorm.nn import GhostBatchNorm1d

    a = _ghost_layer(BatchRenorm1d, 3.0, 5.0, virtual_batch_size=4, warmup=5)
    b = GhostBatchNorm1d(3, dtype=torch.float64, virtual_batch_size=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(12, 3, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(a(x), b(x), **TOL[torch.float64])
    torch.testing.assert_close(a.running_mean, b.running_mean, **TOL[torch.float64])
    torch.testing.assert_close(a.running_var, b.running_var, **TOL[torch.float64])
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
    a.warmup = 0
    assert not torch.allclose(a(x), b(x))  # the corrections are on now
    a.eval()
    plain = BatchRenorm1d(3, dtype=torch.float64).eval()
    plain.load_state_dict(a.state_dict())
    assert torch.equal(a(x), plain(x))
    assert "virtual_batch_size=4" in repr(a) and "virtual_batch_size" not in repr(plain)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_ghost_sizes_are_refused(bad):
    with pytest.raises(
        ValueError, match=r"BatchRenorm1d\(3\): virtual_batch_size must be a positive"
    ):
        BatchRenorm1d(3, virtual_batch_size=bad)


def test_a_last_ghost_batch_of_one_example_is_refused():
    layer = BatchRenorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"last ghost batch .* holds 1 example"):
        layer(torch.randn(9, 3))
