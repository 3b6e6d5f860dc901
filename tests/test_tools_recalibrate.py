"""recalibrate (Alg. 2 lines 8–10): estimators by hand and against an independent float64 oracle,
ours vs torch's layers, split invariance, state restoration, no-data layers, bad input."""

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.functional import reference
from batchnorm.tools import recalibrate
from tests.tolerances import RECAL_F32, RECAL_F64

BN1D = [nn.BatchNorm1d, batchnorm.BatchNorm1d]
IDS = ["torch", "ours"]


def _batches(*columns):
    """Mini-batches (m, 2) from per-channel lists of values."""
    return [torch.tensor(list(zip(*cols, strict=True)), dtype=torch.float64) for cols in columns]


# channel 0: [0, 2], [4, 6]; channel 1: [1, 1], [1, 3]
HAND = _batches(([0.0, 2.0], [1.0, 1.0]), ([4.0, 6.0], [1.0, 3.0]))


@pytest.mark.parametrize("cls", BN1D, ids=IDS)
def test_paper_estimator_by_hand(cls):
    bn = cls(2, eps=1e-5).double()
    report = recalibrate(bn, HAND, "paper")
    # E_B[μ_B] = [(1 + 5)/2, (1 + 2)/2]; m/(m−1)·E_B[σ²_B] = 2·[(1 + 1)/2, (0 + 1)/2]
    assert bn.running_mean.tolist() == [3.0, 1.5]
    assert bn.running_var.tolist() == [2.0, 1.0]
    assert int(bn.num_batches_tracked) == 2
    layer = report.layers[0]
    assert (layer.batches, layer.samples, layer.updated) == (2, 4, True)
    # old statistics were the defaults (mean 0, var 1)
    assert layer.mean_shift == pytest.approx(
        max(3 / math.sqrt(2 + 1e-5), 1.5 / math.sqrt(1 + 1e-5))
    )
    assert layer.std_ratio == pytest.approx(math.sqrt((2 + 1e-5) / (1 + 1e-5)))
    assert report.batches == 2 and report[layer.name] is layer


@pytest.mark.parametrize("cls", BN1D, ids=IDS)
def test_pooled_estimator_by_hand(cls):
    bn = cls(2).double()
    recalibrate(bn, HAND, "pooled")
    # all values: [0, 2, 4, 6] -> mean 3, unbiased var 20/3; [1, 1, 1, 3] -> 1.5, 1
    torch.testing.assert_close(bn.running_mean, torch.tensor([3.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(bn.running_var, torch.tensor([20 / 3, 1.0], dtype=torch.float64))


def test_a_layer_already_in_population_mode_starts_afresh():
    bn = batchnorm.BatchNorm1d(2, stats_mode="population").double()
    bn(torch.randn(10, 2, dtype=torch.float64) * 100)  # an earlier, unrelated pass
    recalibrate(bn, HAND, "paper")
    assert bn.running_mean.tolist() == [3.0, 1.5] and bn.running_var.tolist() == [2.0, 1.0]
    assert bn.stats_mode == "population" and bn.population.batches == 2


@pytest.mark.parametrize("cls", BN1D, ids=IDS)
def test_unequal_batches(cls):
    """A short batch: each batch's own Bessel factor (paper); weighted by samples (pooled)."""
    batches = [*HAND, torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]], dtype=torch.float64)]
    bn = cls(2).double()
    recalibrate(bn, batches, "paper")
    # μ_B = 1, 5, 2 and m/(m−1)σ²_B = 2, 2, 1 for channel 0
    assert bn.running_mean[0].item() == pytest.approx(8 / 3)
    assert bn.running_var[0].item() == pytest.approx(5 / 3)
    recalibrate(bn, batches, "pooled")
    values = torch.tensor([0.0, 2, 4, 6, 1, 2, 3], dtype=torch.float64)
    assert bn.running_mean[0].item() == pytest.approx(values.mean().item())
    assert bn.running_var[0].item() == pytest.approx(values.var().item())


def test_conv_layers_use_m_times_spatial_values():
    """Sec. 3.2: a feature map's mini-batch is N·H·W values, and the Bessel factor m'/(m'−1)."""
    bn = batchnorm.BatchNorm2d(1).double()
    x1 = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]], dtype=torch.float64)  # μ 3, σ² 5
    report = recalibrate(bn, [x1, x1 + 1], "paper")
    assert bn.running_mean.item() == pytest.approx(3.5)
    assert bn.running_var.item() == pytest.approx(5 * 4 / 3)
    assert report.layers[0].samples == 8


def conv_net(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        bn2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False),
        bn2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5, bias=False),
        bn1d(5),
    )


def _oracle(model: nn.Module, batches: list[torch.Tensor]):
    """Every BN layer's float64 inputs in a training-mode pass (on a copy), then both estimators
    computed the plain way: reference.paper_population_statistics, and var_mean of everything."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, bn in batchnorm.tools.bn_layers(model):
        bn.register_forward_pre_hook(
            lambda _m, a, name=name: seen.setdefault(name, []).append(a[0].double())
        )
    with torch.no_grad():
        for b in batches:
            model(b)
    out = {}
    for name, xs in seen.items():
        whole = torch.cat(xs)
        var, mean = torch.var_mean(whole, reference.reduce_dims(whole), correction=1)
        out[name] = {"paper": reference.paper_population_statistics(xs), "pooled": (mean, var)}
    return out


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_whole_model_against_a_float64_oracle_ours_and_torch_alike(backend, estimator):
    model = conv_net()
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(5)]
    expected = _oracle(model, batches)
    ours = batchnorm.convert(model)
    for m in (model, ours):
        report = recalibrate(m, batches, estimator)
        assert [x.name for x in report.layers] == ["1", "4", "9"]
        for name, bn in batchnorm.tools.bn_layers(m):
            mean, var = expected[name][estimator]
            torch.testing.assert_close(bn.running_mean.double(), mean, **RECAL_F32)
            torch.testing.assert_close(bn.running_var.double(), var, **RECAL_F32)
    for (_, a), (_, b) in zip(
        batchnorm.tools.bn_layers(model), batchnorm.tools.bn_layers(ours), strict=True
    ):
        torch.testing.assert_close(a.running_var, b.running_var, **RECAL_F32)


def test_estimators_agree_where_they_must():
    """Equal batch sizes: the same mean; large m: nearly the same variance."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2), nn.BatchNorm1d(2)
    ).double()
    batches = [torch.randn(4000, 4, dtype=torch.float64) * 3 + 1 for _ in range(10)]
    paper, pooled = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate(paper, batches, "paper")
    recalibrate(pooled, batches, "pooled")
    for i in (1, 4):
        torch.testing.assert_close(paper[i].running_mean, pooled[i].running_mean, **RECAL_F64)
        torch.testing.assert_close(paper[i].running_var, pooled[i].running_var, rtol=2e-3, atol=0)
    # ...and they do differ when batches are small (the paper's ignores the spread of μ_B).
    small = [torch.randn(4, 4, dtype=torch.float64) + 2 * i for i in range(5)]
    recalibrate(paper, small, "paper")
    recalibrate(pooled, small, "pooled")
    assert (pooled[1].running_var - paper[1].running_var).abs().max() > 0.1


def test_pooled_is_split_invariant():
    """The first BN layer's pooled estimate does not depend on how the data are batched."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), batchnorm.BatchNorm2d(3), nn.ReLU()).double()
    data = (
        torch.randn(48, 2, 5, 5, dtype=torch.float64)
        + torch.linspace(0, 4, 48)[:, None, None, None]
    )
    results = []
    for size in (2, 5, 16, 48):
        m = copy.deepcopy(model)
        recalibrate(m, data.split(size), "pooled")
        results.append((m[1].running_mean, m[1].running_var))
    for mean, var in results[1:]:
        torch.testing.assert_close(mean, results[0][0], **RECAL_F64)
        torch.testing.assert_close(var, results[0][1], **RECAL_F64)
    paper = copy.deepcopy(model)
    recalibrate(paper, data.split(2), "paper")
    assert (paper[1].running_var - results[0][1]).abs().max() > 0.1  # the paper's is not


class _GradProbe(nn.Module):
    """Records whether autograd was on during each forward."""

    def __init__(self):
        super().__init__()
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return x


def _state(model: nn.Module):
    modes = [m.training for m in model.modules()]
    bns = [
        (bn.momentum, bn.track_running_stats, getattr(bn, "freeze_stats", None), getattr(bn, "stats_mode", None),
         len(bn._forward_pre_hooks), len(bn._forward_hooks))
        for _, bn in batchnorm.tools.bn_layers(model)
    ]  # fmt: skip
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    return modes, bns, buffers


def _mixed_model() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False),
        batchnorm.BatchNorm1d(6, momentum=None),  # cumulative
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 6, bias=False),
        batchnorm.BatchNorm1d(6, momentum=0.3),  # frozen statistics, see below
        _GradProbe(),
        nn.Linear(6, 3, bias=False),
        nn.BatchNorm1d(3),  # torch's
    )
    model[5].freeze_stats = True
    model.train()
    model[3].eval()  # mixed modes must come back as they were
    return model


def test_state_is_restored_when_the_stream_raises():
    model = _mixed_model()
    before = _state(model)

    def stream():
        for _ in range(3):
            yield torch.randn(8, 4)
        raise OSError("the data loader died")

    with pytest.raises(OSError, match="data loader died"):
        recalibrate(model, stream(), "pooled")
    modes, bns, buffers = _state(model)
    assert modes == before[0] and bns == before[1]
    assert all(torch.equal(buffers[k], v) for k, v in before[2].items())  # old statistics kept
    assert model[1].stats_mode == "cumulative" and model[5].stats_mode == "ema"


def test_state_is_restored_after_success_and_nothing_goes_through_autograd():
    model = _mixed_model()
    before = _state(model)
    x = [torch.randn(8, 4, requires_grad=True) for _ in range(4)]
    report = recalibrate(model, x)
    modes, bns, buffers = _state(model)
    assert modes == before[0] and bns == before[1]
    assert model[6].grad_enabled == [False] * 4  # the forward passes ran under no_grad
    assert all(p.grad is None for p in model.parameters())
    for _, bn in batchnorm.tools.bn_layers(model):
        assert bn.running_mean.grad_fn is None and not bn.running_var.requires_grad
    assert all(x.updated for x in report.layers)
    assert not torch.equal(buffers["5.running_var"], before[2]["5.running_var"])  # frozen too
    # the model still trains as before: frozen stats stay frozen, the others update
    model(torch.randn(8, 4))
    assert torch.equal(model[5].running_var, buffers["5.running_var"])
    assert not torch.equal(model[8].running_var, buffers["8.running_var"])


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = batchnorm.BatchNorm1d(3)
        self.use_b = False

    def forward(self, x):
        return self.b(x) if self.use_b else self.a(x)


def test_layers_that_see_no_data_keep_their_statistics_with_a_warning():
    model = _TwoBranches()
    with torch.no_grad():
        model.b.running_mean.fill_(7.0)
    with pytest.warns(UserWarning, match=r"1 BN layer\(s\) saw no data.*\['b'\]"):
        report = recalibrate(model, [torch.randn(5, 3) for _ in range(2)])
    assert report["a"].updated and not report["b"].updated and report["b"].samples == 0
    assert model.b.running_mean.tolist() == [7.0, 7.0, 7.0]
    assert "no data: kept its old statistics" in str(report)


def test_nonfinite_batches_are_skipped_for_both_kinds_of_layer():
    model = nn.Sequential(nn.BatchNorm1d(2), batchnorm.BatchNorm1d(2))
    good = [torch.randn(6, 2) for _ in range(3)]
    bad = torch.full((6, 2), math.nan)
    clean = copy.deepcopy(model)
    recalibrate(clean, good)
    with pytest.warns(UserWarning, match="not finite"):
        recalibrate(model, [good[0], bad, good[1], good[2]])
    for i in (0, 1):
        torch.testing.assert_close(model[i].running_var, clean[i].running_var, rtol=0, atol=0)


def test_batch_formats_and_num_batches():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    assert recalibrate(model, loader).batches == 5  # (input, target) pairs
    endless = itertools.repeat(torch.randn(8, 3))
    assert recalibrate(model, endless, num_batches=3).layers[0].samples == 24
    dicts = [{"x": torch.randn(4, 3)}]
    with pytest.raises(TypeError, match=r"yielded a dict.*forward="):
        recalibrate(model, dicts)
    report = recalibrate(model, dicts, forward=lambda m, b: m(b["x"]))
    assert report.layers[0].samples == 4


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = model[1].running_var.clone()
    with pytest.raises(ValueError, match="batch stream was empty"):
        recalibrate(model, iter([]))
    assert torch.equal(model[1].running_var, before)
    with pytest.raises(ValueError, match="estimator must be 'paper' or 'pooled'"):
        recalibrate(model, [torch.randn(4, 3)], "median")
    with pytest.raises(ValueError, match="no BN layer with running statistics"):
        recalibrate(
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)]
        )
    with pytest.raises(ValueError, match=r"BatchNorm1d\(2\) '1': Expected more than 1 value"):
        recalibrate(model, [torch.randn(1, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate(model, [torch.randn(4, 3)])  # a valid call warns about nothing
