"""smoothness: the loss and its gradient along the gradient step, against a quadratic loss whose
curvature — hence effective β-smoothness — is known exactly."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from batchnorm.tools import smoothness
from batchnorm.tools.instruments import DEFAULT_FACTORS
from tests.instruments import assert_same, batch, cross_entropy, everything, mlp


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ − bᵀθ, ∇L = Aθ − b; the "batch" is ignored."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.theta = nn.Parameter(theta.clone())

    def loss(self) -> torch.Tensor:
        t = self.theta
        return 0.5 * t @ self.a @ t - self.b @ t


def _quadratic_loss(model, _batch):
    return model.loss()


def _spd(n, seed, spread=10.0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(spread), n, dtype=torch.float64)  # 1 … spread
    return q @ torch.diag(eig) @ q.T, q, eig


def test_on_a_quadratic_beta_is_the_curvature_along_the_gradient():
    a, q, eig = _spd(5, 0)
    b = torch.linspace(-1, 1, 5, dtype=torch.float64)
    v = q[:, -1]  # the top eigenvector: eigenvalue 10
    theta = torch.linalg.solve(a, b + 0.7 * v)  # then g = Aθ − b = 0.7 v
    model = Quadratic(a, b, theta)
    lr = 0.05
    r = smoothness(model, _quadratic_loss, None, lr)
    assert r.beta == pytest.approx(float(eig[-1]), rel=1e-12)  # β = λ_max exactly
    g = 0.7 * v
    l0 = float(model.loss().detach())
    assert r.loss == pytest.approx(l0, rel=1e-14)
    assert r.grad_norm == pytest.approx(0.7, rel=1e-14)
    assert r.step_sizes == tuple(lr * c for c in DEFAULT_FACTORS)
    for eta, loss, change, dist in zip(
        r.step_sizes, r.losses, r.grad_changes, r.distances, strict=True
    ):
        # L(θ − ηg) = L(θ) − η‖g‖² + ½η² gᵀAg;  ∇L(θ − ηg) − ∇L(θ) = −ηAg
        assert loss == pytest.approx(l0 - eta * float(g @ g) + 0.5 * eta**2 * float(g @ a @ g))
        assert change == pytest.approx(eta * float((a @ g).norm()), rel=1e-12)
        assert dist == pytest.approx(eta * 0.7, rel=1e-14)
    assert r.loss_variation == pytest.approx(max(r.losses) - min(r.losses))
    assert r.grad_variation == max(r.grad_changes)
    assert torch.equal(model.theta.detach(), theta)  # put back bit for bit
    assert "effective β" in str(r)


@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), lr=st.floats(1e-3, 1.0))
@settings(max_examples=40, deadline=None)
def test_property_quadratic_beta_is_the_rayleigh_ratio_and_below_the_top_eigenvalue(n, seed, lr):
    a, _, eig = _spd(n, seed, spread=50.0)
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    model = Quadratic(a, b, theta)
    r = smoothness(model, _quadratic_loss, None, lr, factors=(0.05, 1.0, 4.0))
    g = a @ theta - b
    expected = float((a @ g).norm() / g.norm())  # the same at every step size
    assert r.beta == pytest.approx(expected, rel=1e-10)
    assert float(eig[0]) * (1 - 1e-10) <= r.beta <= float(eig[-1]) * (1 + 1e-10)


def test_on_a_network_the_model_is_left_exactly_as_it_was():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    cross_entropy(model, batch(seed=5)).backward()  # grads present: must survive
    before = everything(model)
    r = smoothness(model, cross_entropy, batch(), 0.5)
    assert_same(before, everything(model))
    assert r.beta > 0 and len(r.losses) == len(DEFAULT_FACTORS)
    # an independent evaluation of one point of the curve, on a copy
    twin = copy.deepcopy(model)
    loss = cross_entropy(twin, batch())
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    with torch.no_grad():
        for p, g in zip(twin.parameters(), grads, strict=True):
            p -= r.step_sizes[-1] * g
    assert r.losses[-1] == pytest.approx(float(cross_entropy(twin, batch()).detach()), rel=1e-12)


def test_errors():
    model = mlp()
    with pytest.raises(ValueError, match="lr must be a positive"):
        smoothness(model, cross_entropy, batch(), 0.0)
    with pytest.raises(ValueError, match="factors must be positive"):
        smoothness(model, cross_entropy, batch(), 0.1, factors=(0.5, -1.0))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        smoothness(model, cross_entropy, batch(), 0.1)
