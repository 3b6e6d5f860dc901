"""fold (Alg. 2 line 11): the algebra on tensors, on layer pairs, on whole models; ONNX and TorchScript."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.tools import (
    ChannelAffine,
    FrozenBatchNorm2d,
    bn_scale_shift,
    fold,
    fold_bn_into_layer,
    fold_bn_into_next_layer,
    fold_modules,
    freeze,
)
from tests.tolerances import FOLD_F32_REL, FOLD_F64, ONNX_F32

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN layer statistics and γ/β far from the identity, so a missing term shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, batchnorm.tools.FrozenBatchNorm)):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=gen) * 2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model


def n_bn(model: nn.Module) -> int:
    return sum(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, batchnorm.tools.FrozenBatchNorm))
        for m in model.modules()
    )


# -- the algebra --------------------------------------------------------------------------------


def test_scale_shift_and_linear_fold_by_hand():
    scale, shift = bn_scale_shift(
        torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.0]),
        torch.tensor([0.5, 0.0]), eps=1.0,
    )  # fmt: skip
    # scale = γ / sqrt(var + eps) = [2/2, 1/1]; shift = β − mean·scale = [0.5 − 1, 0 + 2]
    assert scale.tolist() == [1.0, 1.0] and shift.tolist() == [-0.5, 2.0]
    assert scale.dtype == torch.float64
    w, b = fold_bn_into_layer(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, torch.tensor([2.0, -1.0]), shift
    )
    assert w.tolist() == [[2.0, 4.0], [-3.0, -4.0]] and b.tolist() == [-0.5, 2.0]
    # BN before the layer: W·(s⊙x + t) + b = (W⊙s)x + (b + W t)
    w, b = fold_bn_into_next_layer(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([10.0, 20.0]),
        torch.tensor([2.0, -1.0]),
        torch.tensor([1.0, 1.0]),
    )
    assert w.tolist() == [[2.0, -2.0], [6.0, -4.0]] and b.tolist() == [13.0, 27.0]


def test_folding_is_done_in_float64_and_rounded_once():
    w = torch.randn(7, 5) * 3
    b = torch.randn(7)
    scale, shift = torch.rand(7, dtype=torch.float64) + 1e-3, torch.randn(7, dtype=torch.float64)
    w32, b32 = fold_bn_into_layer(w, b, scale, shift)
    w64, b64 = fold_bn_into_layer(w.double(), b.double(), scale, shift)
    assert w32.dtype == torch.float32
    assert torch.equal(w32, w64.float()) and torch.equal(b32, b64.float())


def _bn(c: int, dims: int, eps: float, affine: bool, ours: bool, seed: int) -> nn.Module:
    bn = (OURS if ours else BN)[dims](c, eps=eps, affine=affine).double()
    return randomize_bn(bn, seed).eval()


@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 3]),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    bias=st.booleans(),
    transposed=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    affine=st.booleans(),
    ours=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=80, deadline=None)
def test_bn_after_conv_folds_exactly(
    dims, groups, in_per_group, out_per_group, kernel, stride, dilation, padding, bias,
    transposed, eps, affine, ours, seed,
):  # fmt: skip
    """Every conv flavour (grouped, depthwise = in_per_group 1, transposed, no bias) then BN."""
    torch.manual_seed(seed)
    cin, cout = groups * in_per_group, groups * out_per_group
    cls = (CONV_T if transposed else CONV)[dims]
    conv = cls(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=bias)
    conv = conv.double()
    bn = _bn(cout, dims, eps, affine, ours, seed)
    size = 2 * padding + dilation * (kernel - 1) + 2
    x = torch.randn(2, cin, *[size] * dims, dtype=torch.float64)
    folded = fold_modules(conv, bn)
    assert type(folded) is cls and folded.bias is not None
    torch.testing.assert_close(folded(x), bn(conv(x)), **FOLD_F64)
    if not bias:
        assert conv.bias is None  # the arguments are untouched


@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 4]),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    eps=st.sampled_from([1e-5, 0.1]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_bn_before_conv_folds_exactly_unless_zero_padded(
    dims, groups, in_per_group, out_per_group, kernel, stride, padding, padding_mode, bias, eps,
    seed,
):  # fmt: skip
    torch.manual_seed(seed)
    cin, cout = groups * in_per_group, groups * out_per_group
    conv = CONV[dims](
        cin, cout, kernel, stride, padding, groups=groups, bias=bias, padding_mode=padding_mode
    ).double()
    bn = _bn(cin, dims, eps, True, seed % 2 == 0, seed)
    x = torch.randn(2, cin, *[kernel + 3] * dims, dtype=torch.float64)
    if padding > 0 and padding_mode == "zeros":
        with pytest.raises(ValueError, match="zero-pads its input"):
            fold_modules(bn, conv)
        return
    torch.testing.assert_close(fold_modules(bn, conv)(x), conv(bn(x)), **FOLD_F64)


@given(
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    bias=st.booleans(),
    before=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-2]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_linear_and_bn_fold_both_ways(n_in, n_out, bias, before, eps, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias).double()
    x = torch.randn(5, n_in, dtype=torch.float64)
    if before:
        bn = _bn(n_in, 1, eps, True, seed % 2 == 0, seed)
        torch.testing.assert_close(fold_modules(bn, linear)(x), linear(bn(x)), **FOLD_F64)
    else:
        bn = _bn(n_out, 1, eps, True, seed % 2 == 0, seed)
        torch.testing.assert_close(fold_modules(linear, bn)(x), bn(linear(x)), **FOLD_F64)


def test_fold_modules_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) is in training mode.*model.eval"):
        fold_modules(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_modules(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="4 channels are not BN's 5"):
        fold_modules(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="transposed convolution after BN"):
        fold_modules(nn.BatchNorm2d(3).eval(), nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(TypeError, match="one BN layer and one Linear/Conv"):
        fold_modules(conv, nn.ReLU())


# -- whole models ---------------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN, plus a 1x1 conv-BN shortcut; torchvision-style."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(cout)  # ours and torch's side by side
        self.short = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        Block(8, 16, 2, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(16),  # BN before the classifier: folds into the next Linear
        nn.Linear(16, 10),
    )


def mobilenet_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 12, 1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU6(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),  # depthwise
        batchnorm.BatchNorm2d(12),
        nn.ReLU6(),
        nn.Conv2d(12, 6, 1, groups=3),  # grouped pointwise, with bias
        nn.BatchNorm2d(6),
    )


def decoder_like() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(6, 8, 4, 2, 1, bias=False),
        batchnorm.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1, groups=2),
        nn.BatchNorm2d(4),
        nn.Tanh(),
    )


def conv1d_3d_like() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm3d(2),  # input normalization: folds forward into the unpadded conv
        nn.Conv3d(2, 4, 3, bias=False),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Flatten(2),
        nn.Conv1d(4, 5, 3, padding=1, bias=False),
        batchnorm.BatchNorm1d(5),
    )


def mlp_like() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(20),  # input normalization: folds into the first Linear
        nn.Linear(20, 30, bias=False),
        batchnorm.BatchNorm1d(30),
        nn.Sigmoid(),
        nn.Linear(30, 10),
        nn.BatchNorm1d(10),
    )


ARCHITECTURES = {
    "resnet": (resnet_like, (4, 3, 16, 16), 5),
    "mobilenet": (mobilenet_like, (2, 3, 10, 10), 3),
    "decoder": (decoder_like, (2, 6, 5, 5), 2),
    "conv1d-3d": (conv1d_3d_like, (2, 2, 5, 6, 6), 3),
    "mlp": (mlp_like, (8, 20), 3),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_whole_models(arch, dtype):
    make, shape, n_folded = ARCHITECTURES[arch]
    model = randomize_bn(make()).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(shape, dtype=dtype)
    result = fold(model, probe)
    assert n_bn(result.model) == 0
    assert len(result.folded) == n_folded and len(result.folded) + len(result.affine) == n_bn(model)
    x = torch.randn(shape, dtype=dtype)  # an input the check did not see
    with torch.no_grad():
        out, ref = result.model(x), model(x)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, **FOLD_F64)
        assert result.max_abs_diff < 1e-10
    else:
        assert float((out - ref).abs().max()) <= FOLD_F32_REL * float(ref.abs().max())
        assert result.max_rel_diff <= FOLD_F32_REL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(result.model) is type(model)


def test_fold_reports_where_each_bn_went():
    model = randomize_bn(resnet_like()).eval()
    result = fold(model, torch.randn(2, 3, 16, 16))
    assert dict(result.folded) == {
        "1": "0",
        "3.bn1": "3.conv1",
        "3.bn2": "3.conv2",
        "3.short.1": "3.short.0",
        "6": "7",
    }
    assert result.affine == ()
    assert isinstance(result.model[1], nn.Identity) and result.model[7].bias is not None
    assert "5 BN layer(s) folded" in str(result)


class PreAct(nn.Module):
    """BN layers with no layer to fold into: after a residual add, before a ReLU, shared."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_sum = nn.BatchNorm2d(4)
        self.bn_pre = batchnorm.BatchNorm2d(4)
        self.bn_shared = nn.BatchNorm2d(4)
        self.padded = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.bn_sum(self.conv(x) + x)  # input is an add: no layer to fold into
        y = self.padded(self.bn_pre(y))  # next conv zero-pads: no exact fold
        return self.bn_shared(y) + self.bn_shared(x)


class Tied(nn.Module):
    """forward uses the conv's weight a second time: folding into that conv would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


def test_a_layer_whose_weights_forward_reads_is_not_folded_into():
    model = randomize_bn(Tied()).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = fold(model, x)
    assert result.folded == () and result.affine[0][0] == "bn"
    torch.testing.assert_close(result.model(x), model(x), **FOLD_F64)


def test_unfoldable_bn_becomes_one_affine_op():
    model = randomize_bn(PreAct()).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    result = fold(model, x)
    reasons = dict(result.affine)
    assert set(reasons) == {"bn_sum", "bn_pre", "bn_shared"} and result.folded == ()
    assert "zero-pads" in reasons["bn_pre"] and "called 2 times" in reasons["bn_shared"]
    assert all(isinstance(getattr(result.model, n), ChannelAffine) for n in reasons)
    torch.testing.assert_close(result.model(x), model(x), **FOLD_F64)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward, but can trace `inner`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.inner(x)
        return self.bn(y) if y.sum() > 0 else -self.bn(y)


def test_fold_works_around_untraceable_parts():
    model = randomize_bn(nn.Sequential(Untraceable(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))
    model = model.double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = fold(model, x)
    assert dict(result.folded) == {"0.inner.1": "0.inner.0", "2": "1"}
    assert [name for name, _ in result.affine] == ["0.bn"]
    torch.testing.assert_close(result.model(x), model(x), **FOLD_F64)


def test_fold_frozen_layers_and_freeze_stats_layers():
    model = randomize_bn(resnet_like()).eval()
    frozen = freeze(model)  # FrozenBatchNorm layers are fixed affine maps too
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    x = torch.randn(2, 3, 16, 16)
    result = fold(frozen.train(), x)  # frozen layers do not care about train mode
    assert n_bn(result.model) == 0 and len(result.folded) == 5
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)
    ours = batchnorm.freeze_stats(batchnorm.convert(model)).train()
    assert len(fold(ours, x).folded) == 5


def test_fold_errors_name_the_layer():
    model = resnet_like()
    with pytest.raises(ValueError, match=r"BatchNorm2d\(8\) '1' is in training mode"):
        fold(model, torch.randn(2, 3, 16, 16))
    model.eval()
    model[3].bn2 = batchnorm.BatchNorm2d(16, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(16\) '3.bn2' has no running statistics"):
        fold(model, torch.randn(2, 3, 16, 16))


def test_fold_check_raises_above_the_tolerance():
    model = nn.Sequential(nn.Linear(5, 5, bias=False), nn.BatchNorm1d(5), nn.Dropout(0.5))
    randomize_bn(model).eval()
    model[2].train()  # a stochastic layer: the folded model's outputs differ from the model's
    with pytest.raises(ValueError, match=r"differs from the model.*training mode.*\['2'\]"):
        fold(model, torch.randn(64, 5))
    model[2].eval()
    result = fold(model, torch.randn(64, 5))
    assert result.max_abs_diff > 0  # float32 folding rounds differently...
    with pytest.raises(ValueError, match="above atol"):  # ...which a zero tolerance rejects
        fold(model, torch.randn(64, 5), rtol=0.0)


def test_fold_a_bn_root_and_a_model_without_bn():
    bn = randomize_bn(nn.BatchNorm2d(3)).eval()
    x = torch.randn(2, 3, 4, 4)
    result = fold(bn, x)
    assert isinstance(result.model, ChannelAffine)
    torch.testing.assert_close(result.model(x), bn(x))
    plain = nn.Sequential(nn.Linear(3, 2))
    assert fold(plain, torch.randn(2, 3)).folded == ()


# -- export -----------------------------------------------------------------------------------


def _onnx(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        # torch.onnx's own internals use deprecated torch APIs (a FutureWarning in torch 2.13).
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    return program.model_proto


def test_folded_model_exports_to_onnx_without_batchnorm():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = randomize_bn(resnet_like()).eval()
    x = torch.randn(2, 3, 16, 16)
    # optimize=False: the exporter's own optimizer would fold Conv+BN itself and hide ours.
    unfolded = _onnx(model, x)
    assert "BatchNormalization" in {n.op_type for n in unfolded.graph.node}
    folded = fold(model, x).model
    proto = _onnx(folded, x)
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), folded(x), **ONNX_F32)
        torch.testing.assert_close(torch.from_numpy(got), model(x), **ONNX_F32)


def test_affine_op_exports_to_onnx():
    ort = pytest.importorskip("onnxruntime")
    model = randomize_bn(PreAct()).eval()
    x = torch.randn(1, 4, 6, 6)
    folded = fold(model, x).model
    proto = _onnx(folded, x)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), **ONNX_F32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_folded_model_scripts_with_torchscript():
    model = randomize_bn(nn.Sequential(resnet_like(), nn.Sigmoid())).eval()
    model[0][3].bn2 = randomize_bn(nn.BatchNorm2d(16)).eval()  # torch's: scriptable
    pre = randomize_bn(PreAct()).eval()
    x = torch.randn(2, 3, 16, 16)
    for m, inp in ((model, x), (pre, torch.randn(2, 4, 6, 6))):
        folded = fold(m, inp).model
        scripted = torch.jit.script(folded)
        torch.testing.assert_close(scripted(inp), folded(inp), rtol=0, atol=0)


@given(
    widths=st.lists(st.integers(1, 3), min_size=2, max_size=5),
    kinds=st.lists(st.sampled_from(["conv", "convT", "grouped", "bn-first"]), min_size=4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_fold_random_conv_stacks(widths, kinds, bias, seed):
    """Property: any stack of conv flavours with BN after (or before) them folds exactly."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    widths = [2 * w for w in widths]  # even, so that groups=2 always divides
    for kind, cin, cout in zip(kinds, widths, widths[1:], strict=False):
        if kind == "bn-first":
            layers += [nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 2, bias=bias)]
        elif kind == "convT":
            layers += [nn.ConvTranspose2d(cin, cout, 2, 2, bias=bias), nn.BatchNorm2d(cout)]
        elif kind == "grouped":
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, groups=2, bias=bias),
                nn.BatchNorm2d(cout),
            ]
        else:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout)]
        layers.append(nn.ReLU())
    model = randomize_bn(nn.Sequential(*layers[:-1]), seed).double().eval()
    x = torch.randn(2, widths[0], 6, 6, dtype=torch.float64)
    result = fold(model, x)
    assert n_bn(result.model) == 0 and result.affine == ()
    torch.testing.assert_close(result.model(x), model(x), **FOLD_F64)
