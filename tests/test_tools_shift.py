"""ShiftTracker: per-unit statistics of chosen modules' inputs on fixed probe batches (Figure 1(b, c)
for any layer), checked against independent computations, and the drift summaries' definitions on
records whose answer is known."""

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import ShiftTracker
from batchnorm.tools.instruments import LayerShift
from tests.instruments import assert_same, batch, cross_entropy, everything, mlp


def _probe(n=3, rows=20, d=6):
    gen = torch.Generator().manual_seed(9)
    return [torch.randn(rows, d, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(n)]


def test_statistics_match_an_independent_computation():
    model = mlp()
    probe = _probe()
    tracker = ShiftTracker(model, probe)  # default: every BN layer's input, eval mode
    tracker.record(0)
    with torch.no_grad():
        model.eval()
        x = torch.cat(probe)
        u1 = model[0](x)  # the first BN's input
        u4 = model[3](model[2](model[1](u1)))
        model.train()
    report = tracker.report()
    for name, u in (("1", u1), ("4", u4)):
        layer = report[name]
        assert layer.steps == (0,) and layer.where == "input"
        torch.testing.assert_close(layer.mean[0], u.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.std[0], u.std(0, correction=0), rtol=1e-12, atol=1e-12)
        q = torch.quantile(u, torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64), dim=0)
        torch.testing.assert_close(layer.percentiles[0], q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.unit(2), q[:, 2:3].T, rtol=1e-12, atol=1e-12)


def test_conv_inputs_are_per_channel_over_batch_and_positions_and_outputs_too():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False, dtype=torch.float64),
        batchnorm.BatchNorm2d(3, dtype=torch.float64),
        nn.ReLU(),
    )
    probe = [torch.randn(4, 2, 6, 6, dtype=torch.float64)]
    tracker = ShiftTracker(model, probe, nn.ReLU, where="output", quantiles=(0.0, 0.5, 1.0))
    tracker.record(3)
    with torch.no_grad():
        model.eval()
        y = model(probe[0]).transpose(0, 1).reshape(3, -1)
        model.train()
    layer = tracker.report()["2"]
    torch.testing.assert_close(layer.mean[0], y.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.percentiles[0, 0], y.min(1).values)
    torch.testing.assert_close(layer.percentiles[0, 2], y.max(1).values)
    torch.testing.assert_close(layer.percentiles[0, 1], torch.quantile(y, 0.5, dim=1))


def _synthetic(steps, mean, std):
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    return LayerShift("x", "input", tuple(steps), (0.5,), m, s, m[:, None, :])


def test_drift_summaries_on_records_with_a_known_answer():
    # unit 0: the mean walks by 0.5 per record at std 2; units 1, 2: the std grows 1 → 3
    steps = [0, 100, 200, 300, 400]
    mean = [[0.5 * t, 0.0, 0.0] for t in range(5)]
    std = [[2.0, 1 + 0.5 * t, 1 + 0.5 * t] for t in range(5)]
    layer = _synthetic(steps, mean, std)
    # typical std s̃ (median over records): unit 0: 2, units 1, 2: 2
    torch.testing.assert_close(
        layer.typical_std(), torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    )
    # d(0, t) per unit: unit 0: 0.5t/2; units 1, 2: 0.5t/2 -> median 0.25 t
    torch.testing.assert_close(layer.drift_from(), 0.25 * torch.arange(5, dtype=torch.float64))
    # every interval: d = 0.25 over 100 steps -> 2.5 per 1000 steps
    torch.testing.assert_close(layer.interval_change(), torch.full((4,), 2.5, dtype=torch.float64))
    assert layer.excursion() == pytest.approx(1.0)  # 2 / 2 (mean) or 2 / 2 (std), per unit
    s = layer.summary()
    assert (s.start, s.records, s.units) == (0, 5, "std")
    assert (s.from_reference, s.per_interval, s.range) == pytest.approx((1.0, 2.5, 1.0))
    absolute = layer.summary(units="absolute")
    assert (absolute.from_reference, absolute.per_interval) == pytest.approx((2.0, 5.0))
    later = layer.summary(start=150)  # the window starts at the first record ≥ 150
    assert (later.start, later.records) == (200, 3)


def test_an_early_phase_dominates_only_the_numbers_that_include_it():
    # a big jump between the first two records (the chance-level phase), then a slow walk
    steps = list(range(0, 1100, 100))
    mean = [[0.0] * 4] + [[10.0 + 0.01 * t] * 4 for t in range(10)]
    std = [[1.0] * 4] * 11
    layer = _synthetic(steps, mean, std)
    whole, after = layer.summary(), layer.summary(start=100)
    assert whole.from_reference > 10 and whole.range > 10  # the jump is in the window
    assert whole.per_interval == pytest.approx(0.1)  # the median ignores the one early interval
    assert after.from_reference == pytest.approx(0.09) and after.range == pytest.approx(0.09)
    assert after.per_interval == pytest.approx(0.1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_recording_leaves_training_untouched(mode):
    model = nn.Sequential(*mlp(), nn.Dropout(0.5))
    model[4] = batchnorm.NoisyBatchNorm1d(5, dtype=torch.float64, seed=2)  # draws in train mode
    tracker = ShiftTracker(model, _probe(), mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cross_entropy(model, batch()).backward()
    before = everything(model, opt)
    tracker.record(0)
    assert_same(before, everything(model, opt))
    model.eval()
    before = everything(model, opt)
    tracker.record(1)
    assert_same(before, everything(model, opt))  # an eval-mode model stays in eval mode
    r = tracker.report()["1"]
    if mode == "eval":  # the model did not change between the records, nor did the probe
        assert torch.equal(r.mean[0], r.mean[1])


def test_train_mode_uses_batch_statistics():
    model = mlp()
    probe = _probe(n=1)
    ev, tr = (
        ShiftTracker(model, probe, ["2"], where="output"),
        ShiftTracker(model, probe, ["2"], where="output", mode="train"),
    )
    ev.record(0), tr.record(0)
    # train mode: BN normalizes the probe batch with its own statistics; eval: running statistics
    with torch.no_grad():
        model.eval()
        eval_out = model[2](model[1](model[0](probe[0])))
        model.train()
        train_out = torch.tanh(
            nn.functional.batch_norm(model[0](probe[0]), None, None, training=True)
        )
    torch.testing.assert_close(ev.report()["2"].mean[0], eval_out.mean(0))
    torch.testing.assert_close(tr.report()["2"].mean[0], train_out.mean(0), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_and_errors():
    model = mlp()
    tracker = ShiftTracker(model, _probe())
    tracker.record(0), tracker.record(10)
    other = ShiftTracker(model, _probe())
    other.load_state_dict(tracker.state_dict())
    a, b = tracker.report()["4"], other.report()["4"]
    assert a.steps == b.steps and torch.equal(a.percentiles, b.percentiles)
    assert "distribution shift over 2 records" in str(tracker.report())
    with pytest.raises(ValueError, match="steps must increase"):
        tracker.record(10)
    with pytest.raises(ValueError, match="tracks"):
        ShiftTracker(model, _probe(), ["1"]).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="no BN layer"):
        ShiftTracker(mlp(bn=False), _probe())
    with pytest.raises(ValueError, match="no probe batches"):
        ShiftTracker(model, [])
    branch = nn.ModuleDict({"used": nn.Linear(6, 2), "unused": nn.Linear(6, 2)})
    unused = ShiftTracker(branch, _probe(), ["unused"], forward=lambda m, x: m["used"](x.float()))
    with pytest.raises(ValueError, match="'unused' was not called"):
        unused.record(0)
    with pytest.raises(ValueError, match="no record at or after step 99"):
        a.summary(start=99)
