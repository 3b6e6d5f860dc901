"""Noisy BN (Santurkar et al. 2018, Sec. 2.1): BN, then a per-unit random scale and shift drawn at
every training step; plain BN in eval; BN's state_dict."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.nn import BatchNorm1d, BatchNorm2d, NoisyBatchNorm1d, NoisyBatchNorm2d


def _pair(cls=NoisyBatchNorm1d, plain=BatchNorm1d, c=5, **kw):
    """A noisy layer and a plain BN twin with the same (non-trivial) state, float64."""
    noisy = cls(c, dtype=torch.float64, **kw)
    with torch.no_grad():
        noisy.weight.copy_(torch.linspace(0.5, 2.0, c))
        noisy.bias.copy_(torch.linspace(-1.0, 1.0, c))
        noisy.running_mean.copy_(torch.linspace(-0.3, 0.3, c))
        noisy.running_var.copy_(torch.linspace(0.5, 1.5, c))
    twin = plain(c, dtype=torch.float64)
    twin.load_state_dict(noisy.state_dict())
    return noisy, twin


def _noise_of(y, z):
    """Per-channel (s, t) with y = s·z + t, recovered exactly from two examples of each channel,
    and the largest deviation of y from that affine map over the whole batch."""
    y, z = y.detach(), z.detach()
    yf = y.transpose(0, 1).reshape(y.shape[1], -1)
    zf = z.transpose(0, 1).reshape(z.shape[1], -1)
    i, j = zf.argmin(1), zf.argmax(1)
    rows = torch.arange(yf.shape[0])
    s = (yf[rows, j] - yf[rows, i]) / (zf[rows, j] - zf[rows, i])
    t = yf[rows, i] - s * zf[rows, i]
    misfit = (yf - (s[:, None] * zf + t[:, None])).abs().max()
    return s, t, float(misfit)


@pytest.mark.parametrize(
    ("noisy_cls", "torch_cls", "shape"),
    [(NoisyBatchNorm1d, nn.BatchNorm1d, (6, 4)), (NoisyBatchNorm2d, nn.BatchNorm2d, (3, 4, 2, 2))],
)
def test_state_dict_round_trips_with_torch_bn_and_the_noise_has_no_state(
    noisy_cls, torch_cls, shape
):
    noisy = noisy_cls(4, seed=0)
    noisy(torch.randn(shape))  # a training step: running statistics move
    theirs = torch_cls(4)
    theirs.load_state_dict(noisy.state_dict(), strict=True)
    assert noisy.state_dict().keys() == theirs.state_dict().keys()
    back = noisy_cls(4, noise_scale=3.0, noise_shift=0.2)
    back.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in noisy.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert isinstance(noisy, torch_cls) and isinstance(noisy, batchnorm.BatchNorm1d | BatchNorm2d)


def test_eval_is_plain_bn_bit_for_bit_and_draws_nothing():
    noisy, twin = _pair(seed=3)
    noisy.eval(), twin.eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    g_state, cpu_state = noisy.generator.get_state(), torch.get_rng_state()
    y = noisy(x)
    assert torch.equal(y, twin(x))
    assert torch.equal(y, nn.functional.batch_norm(x, *_stats(twin), training=False, eps=twin.eps))
    assert torch.equal(noisy.generator.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), cpu_state)


def _stats(bn):
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def test_zero_strength_is_plain_bn_in_training_too():
    noisy, twin = _pair(noise_scale=1.0, noise_shift=0.0)
    x = torch.randn(9, 5, dtype=torch.float64)
    state = torch.get_rng_state()
    assert torch.equal(noisy(x), twin(x))
    assert torch.equal(torch.get_rng_state(), state)  # drew nothing
    assert torch.equal(noisy.running_mean, twin.running_mean)


def test_the_noise_is_per_unit_within_its_bounds_and_resampled_every_step():
    noisy, twin = _pair(
        NoisyBatchNorm2d, BatchNorm2d, c=6, noise_scale=3.0, noise_shift=0.5, seed=1
    )
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64) * 2 + 1
    draws = []
    for _ in range(3):
        y, z = noisy(x), twin(x)
        s, t, misfit = _noise_of(y, z)
        assert misfit < 1e-12  # one (s, t) per channel: the same for every example and position
        assert bool(((s >= 1) & (s <= 3)).all()) and bool((t.abs() <= 0.5).all())
        draws.append(torch.cat([s, t]))
    assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(draws[1], draws[2])
    # The running statistics come from the clean batch statistics (the noise is after them).
    assert torch.equal(noisy.running_mean, twin.running_mean)
    assert torch.equal(noisy.running_var, twin.running_var)


def test_noise_statistics_match_the_uniform_distributions():
    n, c, steps = 2.5, 16, 400
    noisy, twin = _pair(c=c, noise_scale=n, noise_shift=0.8, seed=7)
    x = torch.randn(10, c, dtype=torch.float64)
    s_all, t_all = [], []
    for _ in range(steps):
        s, t, _ = _noise_of(noisy(x), twin(x))
        s_all.append(s)
        t_all.append(t)
    s, t = torch.cat(s_all), torch.cat(t_all)  # 6400 draws each
    k = s.numel()
    # U(a, b): mean (a + b)/2, variance (b − a)²/12; tolerance 5 standard errors
    for draws, a, b in ((s, 1.0, n), (t, -0.8, 0.8)):
        mean, var = (a + b) / 2, (b - a) ** 2 / 12
        assert abs(float(draws.mean()) - mean) < 5 * (var / k) ** 0.5
        assert abs(float(draws.var()) - var) < 5 * var * (0.8 / k) ** 0.5  # Var of s² for U: 0.8σ⁴
    # independent across units and steps: the correlation of neighbouring draws is ~ 0
    grid = torch.stack(s_all)  # (steps, C)
    lag_t = torch.corrcoef(torch.stack([grid[1:].reshape(-1), grid[:-1].reshape(-1)]))[0, 1]
    lag_c = torch.corrcoef(torch.stack([grid[:, 1:].reshape(-1), grid[:, :-1].reshape(-1)]))[0, 1]
    assert abs(float(lag_t)) < 5 / k**0.5 and abs(float(lag_c)) < 5 / k**0.5


def test_the_gradient_is_bn_backward_of_the_scaled_upstream_gradient():
    noisy, twin = _pair(seed=11)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(8, 5, dtype=torch.float64)
    gen = noisy.generator.get_state()
    y = noisy(x)
    noisy.generator.set_state(gen)
    s, _ = noisy.sample_noise()  # the draw the forward used
    y.backward(g)
    twin(x2).backward(g * s)  # s and t are constants: d(s·z + t)/dz = s
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(noisy.weight.grad, twin.weight.grad, rtol=1e-12, atol=1e-12)


def test_seeding_and_copies():
    a, b = NoisyBatchNorm1d(4, seed=5), NoisyBatchNorm1d(4, seed=5)
    x = torch.randn(6, 4)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), NoisyBatchNorm1d(4, seed=6)(x))
    c = copy.deepcopy(a)  # a copy continues the same stream, independently
    assert torch.equal(a(x), c(x))
    # seed=None: torch's global generator governs the noise
    torch.manual_seed(0)
    u = NoisyBatchNorm1d(4)(x)
    torch.manual_seed(0)
    assert torch.equal(u, NoisyBatchNorm1d(4)(x))
    assert "noise_scale=2.0, noise_shift=1.0, seeded" in repr(a)


def test_bad_strength_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"NoisyBatchNorm1d\(3\).*noise_scale >= 1"):
        NoisyBatchNorm1d(3, noise_scale=0.5)
    with pytest.raises(ValueError, match="noise_shift >= 0"):
        NoisyBatchNorm1d(3, noise_shift=-1.0)
    layer = batchnorm.tools.name_layers(nn.Sequential(NoisyBatchNorm1d(3)))[0]
    layer.noise_scale = 0.0  # set after construction: checked at the next training forward
    with pytest.raises(ValueError, match="'0'"):
        layer(torch.randn(4, 3))


@given(
    scale=st.floats(1.0, 5.0),
    shift=st.floats(0.0, 3.0),
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    spatial=st.sampled_from([(), (3,), (2, 2)]),
)
@settings(max_examples=40, deadline=None)
def test_property_noisy_output_is_a_bounded_per_unit_affine_map_of_bn(scale, shift, n, c, spatial):
    cls, plain = {
        0: (NoisyBatchNorm1d, BatchNorm1d),
        1: (NoisyBatchNorm1d, BatchNorm1d),
        2: (NoisyBatchNorm2d, BatchNorm2d),
    }[len(spatial)]
    noisy, twin = _pair(cls, plain, c=c, noise_scale=scale, noise_shift=shift, seed=0)
    x = torch.randn(n, c, *spatial, dtype=torch.float64)
    y, z = noisy(x), twin(x)
    s, t, misfit = _noise_of(y, z)
    assert misfit < 1e-9 * (1 + float(z.detach().abs().max()) * scale + shift)
    assert bool((s >= 1 - 1e-9).all() & (s <= scale + 1e-9).all())
    assert bool((t.abs() <= shift + 1e-9).all())
