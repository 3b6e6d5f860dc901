"""internal_covariate_shift: Santurkar et al.'s Definition 2.1 against a hand computation on explicit
copies of the model, in float64, for SGD with and without momentum and for Adam."""

import copy
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import internal_covariate_shift
from tests.instruments import batch, cross_entropy, mlp


def _grad(model, b, layer):
    model.zero_grad(set_to_none=True)
    cross_entropy(model, b).backward()
    return model[layer].weight.grad.detach().clone()


def _sgd_by_hand(model, opt, lower_layers, b):
    """W^{t+1} of ``lower_layers`` by SGD's formula (momentum μ, dampening 0, decay λ), on a copy:
    buf ← μ·buf + (g + λp) (buf = g + λp at the first step), p ← p − lr·buf."""
    copy_ = copy.deepcopy(model)
    src = dict(model.named_parameters())
    copy_.zero_grad(set_to_none=True)
    cross_entropy(copy_, b).backward()
    group = opt.param_groups[0]
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    with torch.no_grad():
        for name, p in copy_.named_parameters():
            if int(name.split(".")[0]) not in lower_layers:
                continue
            d = p.grad + wd * p
            if mu:
                buf = opt.state[src[name]].get("momentum_buffer")
                d = d if buf is None else mu * buf + d
            p -= lr * d
    return copy_


def _train(model, opt, steps):
    for s in range(steps):
        b = batch(seed=100 + s)
        opt.zero_grad()
        cross_entropy(model, b).backward()
        opt.step()


@pytest.mark.parametrize(
    "opt_kw",
    [dict(), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.1)],
    ids=["sgd", "momentum", "momentum+decay"],
)
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "plain"])
def test_ics_matches_a_hand_computation_on_copies(opt_kw, bn):
    model = mlp(bn=bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, **opt_kw)
    _train(model, opt, 2)  # momentum buffers exist
    b = batch()
    report = internal_covariate_shift(model, cross_entropy, b, opt)
    linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    assert [x.name for x in report.layers] == [str(i) for i in linear]
    for k in linear:
        g = _grad(copy.deepcopy(model), b, k)
        moved = _sgd_by_hand(model, opt, [i for i in range(len(model)) if i < k], b)
        g_after = _grad(moved, b, k)
        x = report[str(k)]
        diff = float((g - g_after).norm())
        cos = float((g * g_after).sum() / (g.norm() * g_after.norm()))
        assert x.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
        assert x.diff_norm == pytest.approx(diff, rel=1e-9, abs=1e-15)
        assert x.cosine == pytest.approx(cos, rel=1e-12)
        assert x.relative == pytest.approx(diff / float(g.norm()), rel=1e-9, abs=1e-15)
    first = report[str(linear[0])]
    assert first.lower_params == 0 and first.diff_norm == 0 and first.cosine == 1
    # below layer k: the weights (and biases, BN γ/β) of every module called before it
    per_module = [len(list(m.parameters(recurse=False))) for m in model]
    for k in linear[1:]:
        assert report[str(k)].lower_params == sum(per_module[:k])
    assert report.layers[1].diff_norm > 0


def test_ics_with_adam_matches_torch_adam_stepped_on_a_copy():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    _train(model, opt, 3)
    b = batch()
    report = internal_covariate_shift(model, cross_entropy, b, opt, layers=["3"])
    # The oracle: the pair (model, optimizer) deep-copied together; only the layers below take
    # the copied optimizer's step.
    m2, o2 = copy.deepcopy((model, opt))
    g = _grad(m2, b, 3)
    for name, p in m2.named_parameters():
        if int(name.split(".")[0]) >= 3:
            p.grad = None
    o2.step()
    g_after = _grad(m2, b, 3)
    assert report["3"].diff_norm == pytest.approx(float((g - g_after).norm()), rel=1e-9)
    assert report["3"].lower_params == 3  # weight 0, γ and β of BN 1


def test_a_zero_step_gives_zero_shift_exactly_with_dropout_and_noisy_bn():
    # lr = 0: the lower layers do not move, so G' = G bit for bit — only if every pass sees the
    # same Dropout mask, the same noise and the same running statistics.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5, bias=False, dtype=torch.float64),
        batchnorm.NoisyBatchNorm1d(5, dtype=torch.float64, seed=1),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(5, 5, bias=False, dtype=torch.float64),
        batchnorm.NoisyBatchNorm1d(5, dtype=torch.float64),  # global RNG
        nn.Tanh(),
        nn.Linear(5, 4, dtype=torch.float64),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    report = internal_covariate_shift(model, cross_entropy, batch(), opt)
    for x in report.layers:
        assert x.diff_norm == 0.0 and x.cosine == pytest.approx(1.0, abs=1e-15), x
    # and with a real step the noisy network does shift
    opt.param_groups[0]["lr"] = 0.5
    assert internal_covariate_shift(model, cross_entropy, batch(), opt)["7"].diff_norm > 0


def test_step_hooks_are_not_run_and_scheduler_state_is_kept():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    flags = {k: v for k, v in vars(opt).items() if isinstance(v, bool)}
    internal_covariate_shift(model, cross_entropy, batch(), opt)
    assert calls == []
    assert {k: v for k, v in vars(opt).items() if isinstance(v, bool)} == flags
    assert opt.state == {} or all(not s for s in opt.state.values())  # no momentum buffers left
    assert sched.get_last_lr() == [0.1]


def test_layer_selection_and_errors():
    model = mlp()
    by_type = internal_covariate_shift(model, cross_entropy, batch(), _sgd(model), nn.Linear)
    by_module = internal_covariate_shift(
        model, cross_entropy, batch(), _sgd(model), [model[3], "6"]
    )
    assert [x.name for x in by_type.layers] == ["0", "3", "6"]
    assert [x.name for x in by_module.layers] == ["3", "6"]
    assert by_module["3"].diff_norm == by_type["3"].diff_norm
    assert "internal covariate shift" in str(by_type) and "cos" in str(by_type)
    with pytest.raises(KeyError, match="no module named 'nope'"):
        internal_covariate_shift(model, cross_entropy, batch(), _sgd(model), ["nope"])
    with pytest.raises(ValueError, match="layer '2' \\(Tanh\\) has no 'weight'"):
        internal_covariate_shift(model, cross_entropy, batch(), _sgd(model), ["2"])
    with pytest.raises(ValueError, match="not a module of the model"):
        internal_covariate_shift(model, cross_entropy, batch(), _sgd(model), [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="scalar tensor"):
        internal_covariate_shift(model, lambda m, b: m(b[0]), batch(), _sgd(model))
    with pytest.raises(KeyError, match="no measured layer"):
        by_type["1"]


def test_frozen_layers_are_measured_and_stay_frozen():
    model = mlp()
    model[3].weight.requires_grad_(False)
    report = internal_covariate_shift(model, cross_entropy, batch(), _sgd(model))
    assert not model[3].weight.requires_grad
    assert math.isfinite(report["3"].diff_norm) and report["3"].grad_norm > 0
    assert report["6"].lower_params == 5  # weight 0, BN 1 and BN 4 (γ, β): the frozen one stays


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2)
