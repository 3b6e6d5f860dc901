"""The layers against torch.nn.BatchNorm*: same outputs, same statistics, same checkpoints."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from batchnorm.functional import reference
from tests.tolerances import TORCH_AGREEMENT

PAIRS = [
    (BatchNorm1d, nn.BatchNorm1d, (8, 5)),
    (BatchNorm1d, nn.BatchNorm1d, (8, 5, 7)),
    (BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 6)),
    (BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 4)),
]
IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def _pair(ours_cls, torch_cls, **kw):
    ours = ours_cls(5, **kw)
    ref = torch_cls(5, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), PAIRS, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
def test_training_and_eval_match_torch(backend, ours_cls, torch_cls, shape, momentum, affine):
    ours, ref = _pair(ours_cls, torch_cls, momentum=momentum, affine=affine)
    for step in range(4):
        x = torch.randn(shape) * (1 + step) + step
        x_o = x.clone().requires_grad_()
        x_r = x.clone().requires_grad_()
        y_o, y_r = ours(x_o), ref(x_r)
        torch.testing.assert_close(y_o, y_r, **TORCH_AGREEMENT)
        g = torch.randn(shape)
        y_o.backward(g)
        y_r.backward(g)
        torch.testing.assert_close(x_o.grad, x_r.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TORCH_AGREEMENT)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TORCH_AGREEMENT)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    ours.eval()
    ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), **TORCH_AGREEMENT)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), PAIRS, ids=IDS)
def test_without_running_stats_matches_torch(ours_cls, torch_cls, shape):
    ours, ref = _pair(ours_cls, torch_cls, track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    x = torch.randn(shape)
    for mode in (True, False):  # batch statistics in eval too
        ours.train(mode)
        ref.train(mode)
        torch.testing.assert_close(ours(x), ref(x), **TORCH_AGREEMENT)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), PAIRS, ids=IDS)
def test_state_dict_loads_both_ways_strictly(ours_cls, torch_cls, shape):
    ours = ours_cls(5)
    for _ in range(3):
        ours(torch.randn(shape) * 3 + 1)
    assert "nonfinite_skips" not in ours.state_dict()
    # A checkpoint trained with ours, saved and loaded like a user would, into torch's layer...
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    ref = torch_cls(5)
    ref.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    ours.eval()
    ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # ...and the reverse.
    ref.train()
    for _ in range(2):
        ref(torch.randn(shape) - 2)
    back = ours_cls(5)
    back.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    back.eval()
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
    assert set(back.state_dict()) == set(ref.state_dict())


def test_constructor_matches_torch_signature():
    ours = BatchNorm2d(7, 1e-3, 0.2, False, False, device="cpu", dtype=torch.float64)
    ref = nn.BatchNorm2d(7, 1e-3, 0.2, False, False, device="cpu", dtype=torch.float64)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (
        ref.eps,
        ref.momentum,
        ref.affine,
        ref.track_running_stats,
    )
    assert isinstance(ours, nn.BatchNorm2d)
    no_bias = BatchNorm1d(4, bias=False)
    assert no_bias.bias is None and no_bias.weight is not None
    assert set(no_bias.state_dict()) == set(nn.BatchNorm1d(4, bias=False).state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(no_bias(x), nn.BatchNorm1d(4, bias=False)(x))


def test_float64_layer_matches_reference(backend):
    layer = BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y_ref = reference.batch_norm_forward(x, layer.weight.detach(), layer.bias.detach(), 1e-5)[0]
    torch.testing.assert_close(layer(x), y_ref)


def test_eval_never_changes_buffers(backend):
    layer = BatchNorm1d(4)
    layer(torch.randn(10, 4))
    state = copy.deepcopy(layer.state_dict())
    layer.eval()
    for _ in range(3):
        layer(torch.randn(10, 4) * 100)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


# -- population statistics ----------------------------------------------------------------------


def test_population_mode_is_the_paper_formula_on_hand_computable_data(backend):
    layer = BatchNorm1d(1, affine=False, stats_mode="population")
    layer(torch.tensor([[1.0], [3.0]]))  # mu_B = 2, var_B = 1
    layer(torch.tensor([[2.0], [6.0]]))  # mu_B = 4, var_B = 4
    # E[x] = (2 + 4) / 2 = 3; Var[x] = m/(m-1) · E_B[var_B] = 2 · 2.5 = 5
    assert layer.running_mean.tolist() == [3.0]
    assert layer.running_var.tolist() == [5.0]
    assert int(layer.num_batches_tracked) == 2
    assert layer.population.batches == 2 and layer.population.samples == 4
    layer.eval()
    y = layer(torch.tensor([[8.0]]))
    torch.testing.assert_close(y, torch.tensor([[5.0 / (5.0 + 1e-5) ** 0.5]]))


def test_population_mode_matches_reference_estimate_in_float64(backend):
    layer = BatchNorm2d(3, stats_mode="population")
    batches = [torch.randn(6, 3, 4, 4) * 2 + 1e3 for _ in range(5)]
    for b in batches:
        layer(b)
    mean_ref, var_ref = reference.paper_population_statistics([b.double() for b in batches])
    # fused and python reduce float32 inputs in float64; native has PyTorch's float32 numerics
    rtol = 1e-6 if backend == "native" else 1e-11
    torch.testing.assert_close(layer.population.paper()[0], mean_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(layer.population.paper()[1], var_ref, rtol=rtol * 1e3, atol=0)
    torch.testing.assert_close(layer.running_mean, mean_ref.float())
    torch.testing.assert_close(layer.running_var, var_ref.float())


def test_stats_modes_and_momentum():
    assert BatchNorm1d(3).stats_mode == "ema"
    assert BatchNorm1d(3, momentum=None).stats_mode == "cumulative"
    layer = BatchNorm1d(3, stats_mode="cumulative")
    assert layer.momentum is None  # torch's spelling of the same thing
    with pytest.raises(ValueError, match="needs a momentum"):
        BatchNorm1d(3, momentum=None, stats_mode="ema")
    with pytest.raises(ValueError, match="stats_mode must be one of"):
        BatchNorm1d(3, stats_mode="precise")
    layer = BatchNorm1d(3, stats_mode="population")
    assert "stats_mode=population" in repr(layer)
    layer.reset_running_stats()
    assert layer.population.batches == 0


def test_cumulative_mode_equals_torch_momentum_none(backend):
    ours = BatchNorm1d(4, stats_mode="cumulative")
    ref = nn.BatchNorm1d(4, momentum=None)
    for _ in range(6):
        x = torch.randn(7, 4) * 3
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TORCH_AGREEMENT)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TORCH_AGREEMENT)


def test_swa_update_bn_works_on_our_layers():
    """torch.optim.swa_utils.update_bn sets momentum=None and resets: our layer must honour it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4))
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ref.load_state_dict(model.state_dict())
    loader = [torch.randn(8, 3) for _ in range(5)]
    torch.optim.swa_utils.update_bn(loader, model)
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, **TORCH_AGREEMENT)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, **TORCH_AGREEMENT)
    assert model[1].momentum == 0.1  # restored by update_bn


# -- guard, freezing -------------------------------------------------------------------------------


def test_layer_counts_nonfinite_steps_and_warns_once(backend):
    layer = convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))[1]
    bad = torch.randn(4, 3)
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"BatchNorm1d\(3\) '1'.*not finite"):
        layer(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(bad)
    assert int(layer.nonfinite_skips) == 2
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert int(layer.num_batches_tracked) == 0
    nn.BatchNorm1d(3).load_state_dict(layer.state_dict(), strict=True)


def test_population_mode_guards_nonfinite_batches(backend):
    layer = BatchNorm1d(2, stats_mode="population")
    layer(torch.randn(5, 2))
    bad = torch.randn(5, 2)
    bad[1, 1] = float("inf")
    with pytest.warns(UserWarning, match="not finite"):
        layer(bad)
    assert layer.population.batches == 1 and int(layer.nonfinite_skips) == 1
    assert torch.isfinite(layer.running_var).all()


def test_unguarded_layer_behaves_like_torch():
    layer = BatchNorm1d(2, guard_nonfinite=False)
    bad = torch.randn(5, 2)
    bad[0, 0] = float("nan")
    layer(bad)
    assert torch.isnan(layer.running_mean[0])


def test_freeze_stats_keeps_statistics_but_trains_affine(backend):
    layer = BatchNorm2d(3)
    layer(torch.randn(4, 3, 5, 5) + 2)
    state = copy.deepcopy(layer.state_dict())
    layer.freeze_stats = True
    layer.train()  # a fine-tuning script calls model.train(): statistics must stay frozen
    x = torch.randn(4, 3, 5, 5) * 10
    y = layer(x)
    y.square().sum().backward()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer.state_dict()[k], state[k])
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(y, layer(x))  # frozen training forward = the eval transform


# -- errors --------------------------------------------------------------------------------------


EMPTY_LAYERS = {
    "ema": lambda: BatchNorm2d(4),
    "cumulative": lambda: BatchNorm2d(4, momentum=None),
    "population": lambda: BatchNorm2d(4, stats_mode="population"),
    "ghost": lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2),
    "renorm": lambda: batchnorm.BatchRenorm2d(4, warmup=0),
    "no-running-stats": lambda: BatchNorm2d(4, track_running_stats=False),
}


@pytest.mark.parametrize("kind", EMPTY_LAYERS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (5, 4, 0, 3)], ids=["N=0", "H=0"])
def test_an_empty_batch_gives_an_empty_output_and_leaves_the_statistics(backend, kind, shape):
    """As torch (detection heads with no proposals, a last empty shard): an empty output, zero
    gradients for γ and β, running statistics untouched, no warning. Unlike torch, an empty batch
    is not counted in num_batches_tracked: momentum=None's cumulative average stays the mean of
    the batches that had values (next step checked against a layer that never saw it)."""
    layer, twin = EMPTY_LAYERS[kind](), EMPTY_LAYERS[kind]()
    first = torch.randn(6, 4, 3, 3) * 2 + 1
    layer(first), twin(first)
    x = torch.randn(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
        y.sum().backward()
    torch.testing.assert_close(y, nn.BatchNorm2d(4)(x))
    assert torch.equal(layer.weight.grad, torch.zeros(4))
    assert torch.equal(layer.bias.grad, torch.zeros(4))
    assert all(
        torch.equal(a, b)
        for a, b in zip(layer.state_dict().values(), twin.state_dict().values(), strict=True)
    )
    second = torch.randn(6, 4, 3, 3) - 1
    torch.testing.assert_close(layer(second), twin(second))
    for a, b in zip(layer.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_layer_and_the_shape():
    model = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    bn = model[1]
    with pytest.raises(ValueError, match=r"BatchNorm2d\(8\) '1': expected a 4-D input .* \(2, 8\)"):
        bn(torch.randn(2, 8))
    with pytest.raises(
        ValueError, match=r"BatchNorm2d\(8\) '1': expected 8 channels .*\(2, 7, 3, 3\)"
    ):
        bn(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 8, 1, 1))
    with pytest.raises(TypeError, match="floating-point input"):
        bn(torch.ones(2, 8, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="expected a Tensor"):
        bn([1.0, 2.0])
    bn.eval()
    bn(torch.randn(1, 8, 1, 1))  # one value per channel is fine in eval
    with pytest.raises(ValueError, match=r"expected a 2-D or 3-D input \(N, C\) or \(N, C, L\)"):
        BatchNorm1d(8)(torch.randn(2, 8, 3, 3))


def test_bad_hyperparameters():
    # eps as torch (issue 18): accepted at construction; eps = 0 is fine in eval and raises in a
    # training forward; eps < 0 raises in every forward; NaN (torch: NaN outputs) right away.
    zero = BatchNorm1d(3, eps=0.0)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): eps must be positive during training"):
        zero(torch.randn(4, 3))
    zero.eval()
    assert torch.isfinite(zero(torch.randn(4, 3))).all()
    negative = BatchNorm1d(3, eps=-1e-5)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        negative(torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        negative.eval()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps must be a number"):
        BatchNorm1d(3, eps=float("nan"))
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNorm1d(3, momentum=-0.1)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchNorm1d(0)
    layer = BatchNorm1d(3)
    layer.momentum = 0.99 + 1  # set after construction: caught at the next forward
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): momentum must be in"):
        layer(torch.randn(4, 3))


@pytest.mark.parametrize("affine", [True, False])
def test_refused_training_calls_name_the_layer_and_change_nothing(affine):
    """The training step's fast path leaves the checks to the kernels; whatever they refuse must
    still end in the layer-named error and leave every buffer as it was."""
    layer = BatchNorm2d(8, affine=affine)
    layer(torch.randn(4, 8, 3, 3))  # one real step first
    before = {k: v.clone() for k, v in layer.state_dict(keep_vars=True).items()}
    skips = layer.nonfinite_skips.clone()
    bad_inputs = [
        (ValueError, torch.randn(2, 7, 3, 3)),  # channels: caught by γ or, without it, the buffers
        (ValueError, torch.randn(1, 8, 1, 1)),  # m = 1
        (TypeError, torch.ones(2, 8, 3, 3, dtype=torch.int64)),
        (ValueError, torch.randn(2, 8)),
    ]
    for error, x in bad_inputs:
        with pytest.raises(error, match=r"BatchNorm2d\(8\)"):
            layer(x)
    for name, value in [
        ("eps", 0.0),
        ("eps", float("nan")),
        ("momentum", 1.5),
        ("momentum", -0.0001),
    ]:
        old = getattr(layer, name)
        setattr(layer, name, value)
        with pytest.raises(ValueError, match=rf"BatchNorm2d\(8\): {name} must be"):
            layer(torch.randn(4, 8, 3, 3))
        setattr(layer, name, old)
    for k, v in layer.state_dict(keep_vars=True).items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(layer.nonfinite_skips, skips)


# -- convert -------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8, 8, 1),
        _Block(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10, bias=False),
        nn.BatchNorm1d(10),
    )


def test_convert_keeps_a_resnet_outputs_both_ways():
    model = small_resnet()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    model[0].weight.requires_grad_(False)
    model.eval()
    ours = convert(model)
    n_ours = sum(isinstance(m, batchnorm.nn.modules._BatchNormMixin) for m in ours.modules())
    assert n_ours == 7 and not any(type(m) is nn.BatchNorm2d for m in ours.modules())
    assert type(model[1]) is nn.BatchNorm2d  # the input model is not mutated
    assert not ours.training and not ours[1].training
    assert ours[0].weight.requires_grad is False
    assert ours[4].short[1].layer_name == "4.short.1"
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ours(x), model(x), rtol=0, atol=0)
    model.train()
    ours.train()
    torch.testing.assert_close(ours(x), model(x), **TORCH_AGREEMENT)
    back = convert(ours, to="torch")
    assert all(
        type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for _, m in batchnorm.tools.bn_layers(back)
    )
    back.eval()
    model.eval()
    torch.testing.assert_close(back(x), model(x), **TORCH_AGREEMENT)
    assert back.state_dict().keys() == model.state_dict().keys()


def test_convert_root_shared_and_inplace():
    root = convert(nn.BatchNorm1d(3))
    assert type(root) is BatchNorm1d
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted = convert(model, inplace=True)
    assert converted is model and model[0] is model[2] and type(model[0]) is BatchNorm1d
    with pytest.raises(ValueError, match="'to' must be"):
        convert(model, to="jax")
    lazy = nn.Sequential(nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="not initialized"):
        convert(lazy)


def test_pickle_and_deepcopy():
    layer = BatchNorm2d(4, stats_mode="population")
    layer(torch.randn(3, 4, 2, 2))
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.stats_mode == "population" and clone.population.batches == 1
    assert torch.equal(clone.running_var, layer.running_var)
    assert copy.deepcopy(layer).population.batches == 1


@given(
    n=st.integers(2, 6),
    c=st.integers(1, 6),
    h=st.integers(1, 4),
    momentum=st.sampled_from([0.0, 0.3, 1.0, None]),
)
@settings(max_examples=30, deadline=None)
def test_property_agreement_with_torch(n, c, h, momentum):
    ours, ref = BatchNorm2d(c, momentum=momentum), nn.BatchNorm2d(c, momentum=momentum)
    for _ in range(2):
        x = torch.randn(n, c, h, h) * 3 - 1
        torch.testing.assert_close(ours(x), ref(x), **TORCH_AGREEMENT)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TORCH_AGREEMENT)


def test_symbolic_trace_records_one_batch_norm_call():
    """torch.fx traces through our layers (FX quantization/fusion and the model tools need it)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU()).eval()
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"].count(
        torch.nn.functional.batch_norm
    ) == 1
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x))


def test_functional_call_swaps_parameters():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), BatchNorm1d(6))
    ref = convert(model, to="torch")
    params = {k: v * 2 + 1 for k, v in model.named_parameters()}
    x = torch.randn(8, 4)
    out = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(
        out, torch.func.functional_call(ref, params, (x,)), **TORCH_AGREEMENT
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_whole_layer_in_16_bit(dtype):
    ours, ref = BatchNorm2d(4).to(dtype), nn.BatchNorm2d(4).to(dtype)
    x = (torch.randn(3, 4, 5, 5) * 3 + 2).to(dtype)
    one_ulp = 2.0 ** -(10 if dtype == torch.float16 else 7)
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        y = ours(x)
        assert y.dtype == dtype and ours.running_var.dtype == dtype
        # ours computes in float32 and rounds once; torch's 16-bit path may differ by an ulp
        torch.testing.assert_close(y.float(), ref(x).float(), rtol=2 * one_ulp, atol=2 * one_ulp)


def test_cpu_autocast():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU())
    ref = convert(net, to="torch")
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = net(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert net[0].weight.grad.dtype == torch.float32 and net[1].weight.grad is not None
