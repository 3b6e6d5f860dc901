"""scale_check: Sec. 3.3's W → aW invariance, exact to float64 rounding where BN follows the layer,
and the measured departure where it does not."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from batchnorm.tools import scale_check
from tests.instruments import assert_same, batch, cross_entropy, everything, mlp

# float64 rounding of a few hundred operations; ε = 1e-30 makes BN's ε term vanish below it.
EXACT = 1e-12


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_bn_layers_are_scale_invariant_to_float64_rounding(bias):
    model = mlp(sizes=(6, 7, 5, 4), bias=bias, eps=1e-30)
    report = scale_check(model, cross_entropy, batch(), factors=(0.1, 0.5, 3.0, 10.0))
    for layer in ("0", "3"):  # each followed by BN: the bias, if any, is cancelled by BN's mean
        for a in (0.1, 0.5, 3.0, 10.0):
            c = report[layer, a]
            assert c.loss_change < EXACT
            assert c.weight_grad_ratio * a == pytest.approx(1.0, abs=EXACT)  # ∂/∂(aW) = ∂/∂W / a
            assert c.weight_grad_error < EXACT
            assert c.input_grad_ratio == pytest.approx(1.0, abs=EXACT)  # the Jacobian is unchanged
            assert c.input_grad_error < EXACT
            assert c.invariant()
    # the output layer feeds the softmax directly: not invariant
    out = report["6", 10.0]
    assert not out.invariant() and out.loss_change > 1e-3 and out.weight_grad_error > 0.1
    assert "Sec. 3.3" in str(report) and "yes" in str(report) and "no" in str(report)


def test_without_bn_the_ratios_match_an_independent_computation():
    model = mlp(bn=False)
    b = batch()
    report = scale_check(model, cross_entropy, b, layers=["2"], factors=(10.0,))

    def grads(m):
        u = {}
        h = m[2].register_forward_pre_hook(
            lambda mod, args: (u.setdefault("u", args[0].detach().requires_grad_(True)),)
        )
        loss = cross_entropy(m, b)
        h.remove()
        gw, gu = torch.autograd.grad(loss, [m[2].weight, u["u"]])
        return float(loss.detach()), gw, gu

    l1, gw1, gu1 = grads(copy.deepcopy(model))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[2].weight.mul_(10.0)
    l10, gw10, gu10 = grads(scaled)
    c = report["2", 10.0]
    assert c.loss_change == pytest.approx(abs(l10 - l1) / abs(l1), rel=1e-10)
    assert c.weight_grad_ratio == pytest.approx(float(gw10.norm() / gw1.norm()), rel=1e-12)
    assert c.weight_grad_error == pytest.approx(
        float((10 * gw10 - gw1).norm() / gw1.norm()), rel=1e-12
    )
    assert c.input_grad_ratio == pytest.approx(float(gu10.norm() / gu1.norm()), rel=1e-12)
    assert c.input_grad_error == pytest.approx(float((gu10 - gu1).norm() / gu1.norm()), rel=1e-12)
    assert not c.invariant()


@given(a=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_property_invariance_for_any_positive_scale(a, seed):
    model = mlp(sizes=(5, 6, 3), eps=1e-30, seed=seed)
    c = scale_check(model, cross_entropy, batch(d=5, classes=3, seed=seed), ["0"], factors=(a,))[
        "0", a
    ]
    assert c.loss_change < EXACT and c.weight_grad_error < EXACT and c.input_grad_error < EXACT
    assert c.weight_grad_ratio * a == pytest.approx(1.0, abs=EXACT)


def test_the_model_is_left_exactly_as_it_was_and_errors():
    model = mlp()
    x = torch.randn(3, 4, dtype=torch.float64)
    shared = nn.Linear(4, 4, dtype=torch.float64)
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    before = everything(model)
    scale_check(model, cross_entropy, batch())
    assert_same(before, everything(model))
    with pytest.raises(ValueError, match="a > 0"):
        scale_check(model, cross_entropy, batch(), factors=(-1.0,))
    with pytest.raises(ValueError, match="called 2 times"):
        scale_check(twice, lambda m, b: m(b).sum(), x)
    assert_same(before, everything(model))
