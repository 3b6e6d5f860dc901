"""Every instrument leaves the training run alone: a seeded run is bitwise the same with and without
the instruments measuring at every step, and a measurement that fails half-way restores the model,
the optimizer and the random streams all the same."""

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.tools import (
    ShiftTracker,
    accumulate_statistics,
    internal_covariate_shift,
    scale_check,
    smoothness,
)
from tests.instruments import assert_same, assert_state_dicts_equal, everything


def _model():
    """float32 (the fused kernels' path), our BN, torch's BN, Dropout and noisy BN (own generator
    and global), so every kind of state and randomness is in play."""
    torch.manual_seed(0)
    return batchnorm.tools.name_layers(
        nn.Sequential(
            nn.Linear(12, 16, bias=False),
            batchnorm.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(16, 16, bias=False),
            batchnorm.NoisyBatchNorm1d(16, seed=3),
            nn.Sigmoid(),
            nn.Linear(16, 16, bias=False),
            nn.BatchNorm1d(16),
            batchnorm.NoisyBatchNorm1d(16, noise_scale=1.5, noise_shift=0.3),  # global RNG
            nn.Tanh(),
            nn.Linear(16, 5),
        )
    )


def _batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(24, 12, generator=gen), torch.randint(0, 5, (24,), generator=gen)


def _loss(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def _optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _run(kind, instrumented, steps=4):
    model = _model()
    opt = _optimizer(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    post_hook_calls = []
    opt.register_step_post_hook(lambda o, a, k: post_hook_calls.append(1))
    probe = [_batch(-1)[0]]
    trackers = [
        ShiftTracker(model, probe),
        ShiftTracker(model, probe, (nn.Sigmoid, nn.Tanh), mode="train"),
    ]
    losses = []
    for step in range(steps):
        b = _batch(step)
        if instrumented:
            internal_covariate_shift(model, _loss, b, opt)
            smoothness(model, _loss, b, sched.get_last_lr()[0], factors=(0.1, 1.0, 4.0))
            scale_check(model, _loss, b, ["0", "4"], factors=(0.5, 2.0))
            for t in trackers:
                t.record(step)
        opt.zero_grad()
        loss = _loss(model, b)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return {
        "losses": torch.stack(losses),
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "grads": [p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "noise": model[5].generator.get_state(),
        "hooks": len(post_hook_calls),
        "lr": sched.get_last_lr(),
    }


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_training_is_bitwise_the_same_with_every_instrument_measuring_every_step(kind):
    plain, measured = _run(kind, False), _run(kind, True)
    assert torch.equal(plain["losses"], measured["losses"])
    assert_state_dicts_equal(plain["model"], measured["model"])
    assert_state_dicts_equal(plain["opt"], measured["opt"])
    for a, b in zip(plain["grads"], measured["grads"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain["rng"], measured["rng"])
    assert torch.equal(plain["noise"], measured["noise"])
    assert plain["hooks"] == measured["hooks"] == 4 and plain["lr"] == measured["lr"]


class Boom(RuntimeError):
    pass


def _failing(after):
    """A loss that raises on its ``after``-th call (1-based), after running the forward."""
    calls = itertools.count(1)

    def loss(model, b):
        out = _loss(model, b)
        if next(calls) == after:
            raise Boom(f"call {after}")
        return out

    return loss


def _messy():
    """A model mid-training: momentum buffers, gradients present, a frozen layer, one module in
    eval mode."""
    model = _model()
    opt = _optimizer("sgd", model)
    for step in range(2):
        opt.zero_grad()
        _loss(model, _batch(step)).backward()
        opt.step()
    _loss(model, _batch(5)).backward()  # leave gradients in .grad
    model[7].weight.requires_grad_(False)
    model[3].eval()
    return model, opt


@pytest.mark.parametrize("after", [1, 2, 4])
@pytest.mark.parametrize("instrument", ["ics", "smoothness", "scale"])
def test_a_failing_measurement_restores_everything(instrument, after):
    model, opt = _messy()
    before = everything(model, opt)
    loss = _failing(after)
    run = {
        "ics": lambda: internal_covariate_shift(model, loss, _batch(0), opt),
        "smoothness": lambda: smoothness(model, loss, _batch(0), 0.2),
        "scale": lambda: scale_check(model, loss, _batch(0)),
    }[instrument]
    with pytest.raises(Boom):
        run()
    assert_same(before, everything(model, opt))


def test_a_failing_probe_pass_restores_everything():
    model, opt = _messy()
    calls = itertools.count()

    def forward(m, x):
        m(x)
        if next(calls) == 1:
            raise Boom("probe")

    tracker = ShiftTracker(model, [_batch(0)[0]] * 3, mode="train", forward=forward)
    before = everything(model, opt)
    with pytest.raises(Boom):
        tracker.record(0)
    assert_same(before, everything(model, opt))
    assert tracker.steps == []  # nothing half-recorded


def test_measuring_inside_an_accumulation_block_does_not_count_as_a_micro_batch():
    results = []
    for measure in (False, True):
        model = _model()
        opt = _optimizer("sgd", model)
        with accumulate_statistics(model):
            for step in range(3):
                if measure:
                    internal_covariate_shift(model, _loss, _batch(step), opt)
                _loss(model, _batch(step)).backward()
        results.append(model.state_dict())
    assert_state_dicts_equal(*results)


def test_the_user_guide_example_runs():
    guide = Path(__file__).resolve().parent.parent / "docs" / "instruments.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(guide), "exec"), {"__name__": "instruments_example"})
