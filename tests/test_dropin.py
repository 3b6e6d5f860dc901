"""Issue 18, "drop-in for real": one test (at least) per defect found by running PyTorch's own
batch-norm tests on our layers. Each failed before its fix; the differential harness
(test_torch_differential.py) holds the same behaviour over all of PyTorch's sample inputs.

"auto" below means no backend override: the layers' own fast path into the fused kernels, the path
a user's model takes (the ``backend`` fixture forces a backend through ``use_backend``, which skips
that path, and is how the empty-batch defect went unnoticed).
"""

import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.composite_compliance import generate_cct_and_mode
from torch.testing._internal.logging_tensor import LoggingTensor
from torch.testing._internal.two_tensor import TwoTensor

import batchnorm
from batchnorm import functional as bnf
from batchnorm.functional import use_backend
from batchnorm.nn.surgery import swap_class
from tests.conftest import CPU_BACKENDS, FUSED_TESTED
from tests.tolerances import TORCH_AGREEMENT

PATHS = (["auto"] if FUSED_TESTED else []) + CPU_BACKENDS
LAYERS = {
    "1d": (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 3, 4)),
    "2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d, (6, 3, 2, 2)),
    "3d": (batchnorm.BatchNorm3d, nn.BatchNorm3d, (6, 3, 2, 2, 2)),
}


def on_path(path: str):
    return contextlib.nullcontext() if path == "auto" else use_backend(path)


# -- 1. an empty batch on the fused path ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", LAYERS)
def test_empty_batch_gives_zero_parameter_gradients_on_every_path(path, kind):
    """Issue 18 item 1: with the kernels loaded, an empty batch left weight.grad = NaN (torch:
    zeros), and one SGD step later every output was NaN."""
    ours_cls, torch_cls, shape = LAYERS[kind]
    layer, ref = ours_cls(3), torch_cls(3)
    with on_path(path):
        layer(torch.randn(shape))  # a real batch first: the kernels are loaded and used
        ref(torch.randn(shape))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.zero_grad()
        x = torch.randn(0, *shape[1:], requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert torch.equal(layer.weight.grad, torch.zeros(3)), layer.weight.grad
        assert torch.equal(layer.bias.grad, torch.zeros(3)), layer.bias.grad
        for k, v in layer.state_dict().items():
            if k != "num_batches_tracked":  # (documented: torch counts empty batches)
                assert torch.equal(v, before[k]), k
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
        assert all(torch.isfinite(p).all() for p in layer.parameters())
        assert torch.isfinite(layer(torch.randn(shape))).all()


@pytest.mark.skipif(not FUSED_TESTED, reason="the fused kernels are not built here")
def test_the_fused_op_itself_gives_zero_parameter_gradients_for_an_empty_batch():
    x = torch.randn(0, 3, 5, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    y, _, _ = torch.ops.batchnorm.train_forward(x, w, b, None, None, None, None, 0.1, 1e-5, True)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(3)) and torch.equal(db, dw)


# -- 2. meta-device construction, load_state_dict(assign=True) ------------------------------


def _trained_torch_layer(torch_cls, shape):
    ref = torch_cls(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    for _ in range(2):
        ref(torch.randn(shape) * 2 + 1)
    return ref


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("keep_vars", [False, True])
def test_meta_construction_and_assign_loading_gives_torchs_results(path, kind, keep_vars):
    """Issue 18 item 2: built on meta and loaded with assign=True, a training forward returned
    uninitialized memory (values like 1e-38), silently: the counter buffer stayed on meta and the
    op ran its fake kernel."""
    ours_cls, torch_cls, shape = LAYERS[kind]
    ref = _trained_torch_layer(torch_cls, shape)
    with torch.device("meta"):
        layer = ours_cls(3)
    layer.load_state_dict(copy.deepcopy(ref.state_dict(keep_vars=keep_vars)), assign=True)
    assert not any(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    assert not layer.nonfinite_skips.is_meta
    x = torch.randn(shape) * 3 - 1
    with on_path(path):
        for mode in (True, False):
            layer.train(mode)
            ref.train(mode)
            torch.testing.assert_close(layer(x), ref(x), **TORCH_AGREEMENT)
    for (k, a), (k2, b) in zip(layer.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, **TORCH_AGREEMENT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("what", ["everything", "running_mean", "weight"])
def test_tensors_left_on_meta_never_reach_the_kernels(path, what):
    """A real input with a parameter or buffer still on meta: torch's error, never a fake result."""
    with torch.device("meta"):
        layer, ref = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    if what != "everything":
        for m in (layer, ref):
            m.load_state_dict(nn.BatchNorm2d(3).state_dict(), assign=True)
            setattr(m, what, torch.zeros(3, device="meta") if what == "running_mean" else None)
            if what == "weight":
                m.weight = nn.Parameter(torch.ones(3, device="meta"))
    x = torch.randn(4, 3, 2, 2)
    for mode in (True, False):
        layer.train(mode)
        ref.train(mode)
        with pytest.raises(RuntimeError) as torch_error:
            ref(x)
        with on_path(path), pytest.raises(type(torch_error.value), match="meta"):
            layer(x)


def test_to_empty_from_meta_then_reset_trains_like_torch():
    with torch.device("meta"):
        layer, ref = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    for m in (layer, ref):
        m.to_empty(device="cpu")
        m.reset_parameters()
    assert int(layer.nonfinite_skips) == 0
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), ref(x), **TORCH_AGREEMENT)
    torch.testing.assert_close(layer.running_var, ref.running_var, **TORCH_AGREEMENT)


# -- 3. exactly torch's parameters and buffers --------------------------------------------------

CONFIGS = {
    "default": {},
    "no-stats": dict(track_running_stats=False),
    "no-affine": dict(affine=False),
    "neither": dict(affine=False, track_running_stats=False),
    "no-bias": dict(bias=False),
    "cumulative": dict(momentum=None),
}
FAMILIES = {
    "BatchNorm1d": (batchnorm.BatchNorm1d, nn.BatchNorm1d, {}),
    "BatchNorm2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d, {}),
    "BatchNorm3d": (batchnorm.BatchNorm3d, nn.BatchNorm3d, {}),
    "SyncBatchNorm": (batchnorm.SyncBatchNorm, nn.SyncBatchNorm, {}),
    "BatchRenorm2d": (batchnorm.BatchRenorm2d, nn.BatchNorm2d, {}),
    "GhostBatchNorm2d": (batchnorm.GhostBatchNorm2d, nn.BatchNorm2d, dict(virtual_batch_size=2)),
}


def _tensor_signature(module: nn.Module) -> dict:
    return dict(
        parameters=[(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()],
        buffers=[(n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()],
        n_buffers=len(list(module.buffers())),
        state_dict=list(module.state_dict()),
        none_buffers=sorted(k for k, v in module._buffers.items() if v is None),
        none_parameters=sorted(k for k, v in module._parameters.items() if v is None),
    )


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_torchs_parameters_and_buffers(family, config):
    """Issue 18 item 3: `list(BatchNorm2d(2, track_running_stats=False).buffers())` was
    [nonfinite_skips] where torch's is []: DDP broadcasts buffers, tools count and move them."""
    ours_cls, torch_cls, extra = FAMILIES[family]
    kw = CONFIGS[config]
    if family == "BatchRenorm2d" and kw.get("track_running_stats") is False:
        pytest.skip("Batch Renorm needs running statistics (it raises, tested in test_renorm)")
    ours, ref = ours_cls(4, **kw, **extra), torch_cls(4, **kw)
    assert _tensor_signature(ours) == _tensor_signature(ref)
    x = (
        torch.randn(6, 4, 3)
        if "1d" in family
        else torch.randn(6, 4, 3, 3, *(3,) * ("3d" in family))
    )
    ours(x)  # a forward must not register anything either
    assert _tensor_signature(ours) == _tensor_signature(ref)


def test_the_counter_still_counts_warns_once_and_is_readable_through_tools():
    model = nn.Sequential(batchnorm.BatchNorm1d(3), nn.ReLU(), batchnorm.BatchNorm1d(3))
    bad = torch.randn(4, 3)
    bad[0, 1] = float("nan")
    with pytest.warns(UserWarning, match="not finite"):
        model(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(bad)  # the second skip: counted, no second warning
    assert batchnorm.tools.nonfinite_skips(model) == {"0": 2, "2": 2}
    assert batchnorm.tools.nonfinite_skips(nn.Sequential(nn.BatchNorm1d(3))) == {}
    assert "nonfinite_skips" not in dict(model.named_buffers()) | model.state_dict()
    model[0].reset_running_stats()
    assert batchnorm.tools.nonfinite_skips(model) == {"0": 0, "2": 2}


def test_the_counter_follows_the_layer_and_survives_copies():
    layer = batchnorm.BatchNorm2d(3)
    layer.nonfinite_skips.fill_(5)
    for convert in (
        lambda m: m.double(),
        lambda m: m.half(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.type(torch.float64),
        lambda m: m.to("cpu"),
        lambda m: m.share_memory(),
        lambda m: m.to("meta"),  # stays on the CPU: it could not count on meta
        lambda m: m.to_empty(device="cpu"),  # (keeps its value: to_empty only concerns storage)
        copy.deepcopy,
        lambda m: pickle.loads(pickle.dumps(m)),
    ):
        layer = convert(layer)
        counter = layer.nonfinite_skips
        assert counter.dtype == torch.long and counter.device.type == "cpu"
        assert int(counter) == 5
    buffer = io.BytesIO()
    torch.save(batchnorm.BatchNorm2d(3), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert int(loaded.nonfinite_skips) == 0 and "nonfinite_skips" not in dict(
        loaded.named_buffers()
    )


def test_a_layer_pickled_with_the_old_counter_buffer_loads_without_it():
    layer = batchnorm.BatchNorm2d(3)
    del layer.nonfinite_skips
    layer.register_buffer("nonfinite_skips", torch.tensor(2), persistent=False)  # the old layout
    back = pickle.loads(pickle.dumps(layer))
    assert [n for n, _ in back.named_buffers()] == [n for n, _ in nn.BatchNorm2d(3).named_buffers()]
    assert int(back.nonfinite_skips) == 2
    back(torch.randn(4, 3, 2, 2))


def test_swap_class_and_convert_share_the_counter():
    layer = batchnorm.BatchNorm2d(3)
    layer.nonfinite_skips.fill_(1)
    synced = swap_class(layer, batchnorm.SyncBatchNorm)
    assert synced.nonfinite_skips is layer.nonfinite_skips
    back = batchnorm.tools.convert_from_sync(batchnorm.tools.convert_sync(nn.Sequential(layer)))
    assert int(back[0].nonfinite_skips) == 1
    assert not dict(back[0].named_buffers()).keys() - {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


# -- 4. tensor subclasses take a path that works ------------------------------------------------


def _unwrap(t):
    if isinstance(t, TwoTensor):
        return t.a
    if isinstance(t, LoggingTensor):
        return t.elem
    return t


SUBCLASSES = {
    "TwoTensor": lambda t: TwoTensor(t, t.clone()),
    "LoggingTensor": LoggingTensor,
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("subclass", SUBCLASSES)
@pytest.mark.parametrize("wrapped", ["input", "parameters", "all"])
def test_dispatch_subclasses_in_training_match_torch(path, subclass, wrapped):
    """Issue 18 item 4: a __torch_dispatch__ wrapper reached the fused kernel ("data is not
    allocated"). Wrapped inputs and/or parameters now take PyTorch's own path and give torch's
    result."""
    wrap = SUBCLASSES[subclass]
    ours, ref = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    if wrapped in ("parameters", "all"):
        w, b = torch.rand(3) + 0.5, torch.randn(3)
        for m in (ours, ref):
            m.weight = nn.Parameter(wrap(w.clone()))
            m.bias = nn.Parameter(wrap(b.clone()))
    if wrapped == "all":
        for m in (ours, ref):
            m.running_mean, m.running_var = wrap(torch.zeros(3)), wrap(torch.ones(3))
    xo = wrap(x.clone()).requires_grad_() if wrapped != "parameters" else x.clone().requires_grad_()
    xr = wrap(x.clone()).requires_grad_() if wrapped != "parameters" else x.clone().requires_grad_()
    with on_path(path):
        try:
            yr = ref(xr)
        except Exception as error:  # a combination torch refuses: ours must refuse it alike
            with pytest.raises(type(error)):
                ours(xo)
            return
        yo = ours(xo)
        assert type(yo) is type(yr)
        torch.testing.assert_close(_unwrap(yo), _unwrap(yr), **TORCH_AGREEMENT)
        yo.sum().backward()
        yr.sum().backward()
    torch.testing.assert_close(_unwrap(xo.grad), _unwrap(xr.grad), **TORCH_AGREEMENT)
    torch.testing.assert_close(
        _unwrap(ours.weight.grad), _unwrap(ref.weight.grad), **TORCH_AGREEMENT
    )
    for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(_unwrap(a), _unwrap(b), **TORCH_AGREEMENT)


@pytest.mark.parametrize("path", PATHS)
def test_composite_compliance_wrappers_in_every_position(path):
    """torch.testing._internal.composite_compliance's wrapper (CompositeCompliantTensor, which
    raises on any data access) around the input, γ, β and the running statistics, one at a time and
    all at once, through the layer and the functional form, training and eval."""
    cct, mode = generate_cct_and_mode()
    names = ["input", "weight", "bias", "running_mean", "running_var"]
    base = dict(
        input=torch.randn(5, 3, 4),
        weight=torch.rand(3) + 0.5,
        bias=torch.randn(3),
        running_mean=torch.randn(3),
        running_var=torch.rand(3) + 0.5,
    )
    for training in (True, False):
        for which in [*([n] for n in names), names]:
            args = {k: v.clone() for k, v in base.items()}
            expected = F.batch_norm(**{k: v.clone() for k, v in base.items()}, training=training)
            args = {k: cct(v, mode) if k in which else v for k, v in args.items()}
            with on_path(path):
                got = bnf.batch_norm(**args, training=training)
            got = got.elem if isinstance(got, cct) else got
            torch.testing.assert_close(got, expected, **TORCH_AGREEMENT)


def test_torch_function_subclass_sees_torchs_functional():
    """A __torch_function__ subclass is handed torch's F.batch_norm, as with torch's layer."""
    seen = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3).as_subclass(Traced)
    y = batchnorm.BatchNorm1d(3)(x)
    assert type(y) is Traced and "batch_norm" in seen
    seen.clear()
    bnf.batch_norm(x, None, None, training=True)
    assert "batch_norm" in seen


# -- 5. stricter than torch where torch is well defined -------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_eps_zero_as_torch(path):
    """eps = 0 is accepted at construction (torch does), exact in eval and for non-constant
    channels; a training forward raises as torch's does (a constant channel divides by zero)."""
    ours, ref = batchnorm.BatchNorm1d(3, eps=0.0), nn.BatchNorm1d(3, eps=0.0)
    x = torch.randn(6, 3)
    with on_path(path):
        for error_from in (ref, ours):
            with pytest.raises(ValueError, match="eps must be positive during training"):
                error_from(x)
        ours.eval()
        ref.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
        for fn in (F.batch_norm, bnf.batch_norm):
            with pytest.raises(ValueError, match="eps must be positive during training"):
                fn(x, None, None, training=True, eps=0.0)
            with pytest.raises(ValueError, match="eps must be non-negative"):
                fn(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
        torch.testing.assert_close(
            bnf.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0),
            F.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0),
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stats", [0, 1, None])
def test_one_dimensional_empty_inputs_as_torch(path, training, stats):
    """torch's F.batch_norm takes an empty 1-D input (its OpInfo samples (0,)) and returns it."""
    x = torch.randn(0, requires_grad=True)
    args = (torch.zeros(stats), torch.ones(stats)) if stats is not None else (None, None)
    with on_path(path):
        try:
            expected = F.batch_norm(x, *args, training=training)
        except Exception as error:
            with pytest.raises(type(error)):
                bnf.batch_norm(x, *args, training=training)
            return
        got = bnf.batch_norm(x, *args, training=training)
    assert got.shape == expected.shape == (0,)


@pytest.mark.parametrize("shape", [(5,), (1,), ()])
@pytest.mark.parametrize("training", [True, False])
def test_one_dimensional_inputs_with_values_raise_what_torch_raises(shape, training):
    """torch has no channel dimension to read there and raises (RuntimeError, IndexError or
    ValueError depending on the arguments); ours raises one error naming the shape that is an
    instance of each of those."""
    x = torch.randn(shape)
    for args in [(None, None), (torch.zeros(1), torch.ones(1)), (torch.zeros(5), torch.ones(5))]:
        with pytest.raises(Exception) as torch_error:
            F.batch_norm(x, *args, training=training)
        with pytest.raises(type(torch_error.value), match=r"2 dimensions|more than 1 value"):
            bnf.batch_norm(x, *args, training=training)


def test_momentum_outside_the_unit_interval_raises_in_training_only():
    """momentum=-1.2 in eval is one of torch's OpInfo samples (momentum unused there): accepted.
    In a training step that updates running statistics it is always a user error: raises (a
    documented difference; torch extrapolates)."""
    x, rm, rv = torch.randn(3, 2, 4), torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(
        bnf.batch_norm(x, rm, rv, momentum=-1.2), F.batch_norm(x, rm, rv, momentum=-1.2)
    )
    for fused in [False, *([True] if FUSED_TESTED else [])]:
        with (
            contextlib.nullcontext() if fused else use_backend("python"),
            pytest.raises(ValueError, match="momentum must be in"),
        ):
            bnf.batch_norm(x, rm, rv, training=True, momentum=-1.0)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))
    # without running statistics momentum is unused, as in torch
    torch.testing.assert_close(
        bnf.batch_norm(x, None, None, training=True, momentum=-1.0),
        F.batch_norm(x, None, None, training=True, momentum=-1.0),
        **TORCH_AGREEMENT,
    )


def test_wrong_sizes_raise_errors_torch_code_catches():
    """torch raises RuntimeError for per-channel arguments of the wrong size and
    NotImplementedError for integer inputs; ours name the argument and shape and are instances of
    those (and of ValueError/TypeError, as before)."""
    x = torch.randn(2, 10)
    for kw in (
        dict(running_mean=torch.rand(9)),
        dict(running_var=torch.rand(11)),
        dict(weight=torch.rand(9)),
        dict(bias=torch.rand(11)),
    ):
        args = dict(running_mean=torch.rand(10), running_var=torch.rand(10)) | kw
        for training in (True, False):
            with pytest.raises(RuntimeError):
                F.batch_norm(x, training=training, **args)
            with pytest.raises(RuntimeError, match="should contain 10 elements") as ours:
                bnf.batch_norm(x, training=training, **args)
            assert isinstance(ours.value, ValueError)
    with pytest.raises(NotImplementedError):
        bnf.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(3\): expected 3 channels"):
        batchnorm.BatchNorm2d(3)(torch.randn(2, 4, 2, 2))


# -- documented differences (docs/differences.md), pinned -----------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_mixed_dtypes_torch_refuses_run_in_the_input_dtype(path):
    """torch's CPU kernel refuses a float64 input to a float32 layer ("mixed dtype"); ours
    computes in the input's dtype, with the parameters and buffers in theirs."""
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        nn.BatchNorm1d(3)(x)
    layer = batchnorm.BatchNorm1d(3)
    with on_path(path):
        y = layer(x)
    assert y.dtype == torch.float64 and layer.running_mean.dtype == torch.float32
    ref = nn.BatchNorm1d(3).double()
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var.float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_far_from_zero_are_normalized_exactly(path, dtype):
    """torch's CPU kernel loses 16-bit statistics when |mean| >> std: bfloat16 [-50, -50.25]
    comes out [0, -1.41] instead of [1, -1]. Ours (every backend) computes them in float32."""
    x = torch.tensor([[-50.0], [-50.25]], dtype=dtype)
    exact = F.batch_norm(x.double(), None, None, training=True)
    layer = batchnorm.BatchNorm1d(1, affine=False, track_running_stats=False).to(dtype)
    with on_path(path):
        got = layer(x)
    torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=1e-2)
    theirs = nn.BatchNorm1d(1, affine=False, track_running_stats=False).to(dtype)(x)
    if dtype == torch.bfloat16:  # (documents torch's error; if torch fixes it, drop the row)
        assert (theirs.double() - exact).abs().max() > 0.5
