"""Differential tests: our layers and functional form against PyTorch's own, case by case.

Sources, each read and rewritten here (PyTorch's test code itself is not copied):

- the sample inputs PyTorch's test infrastructure generates: the ``ModuleInfo`` inputs of
  ``torch.nn.BatchNorm1d/2d/3d`` (``common_modules.py``, run by ``test/test_modules.py``) and the
  ``OpInfo`` samples of ``nn.functional.batch_norm`` (``common_methods_invocations.py``, run by
  ``test/test_ops*.py``), imported from ``torch.testing._internal`` (see tests/torch_testing.py);
- the generic checks ``test_modules.py`` and ``test_ops.py`` apply to them (forward, errors,
  pickling, non-contiguous inputs, memory formats, factory kwargs, meta/to_empty, gradcheck and
  gradgradcheck with forward AD, composite compliance);
- the batch-norm cases of ``test/test_nn.py`` (TestNN, TestNNDeviceType) and of
  ``test/nn/test_load_state_dict.py``. The distributed SyncBatchNorm cases are in
  test_torch_differential_distributed.py.

Every case runs torch's implementation and ours on the same values and requires the same outputs,
gradients, running statistics, parameters and buffers, and the same errors (ours an instance of
torch's exception class), in every backend: on CPU "fused", "python" and "native", on CUDA
(when there is one) "native". A difference that remains is listed in docs/differences.md; the
cases it concerns check the documented behaviour instead (``DIFFERENCES`` below).
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter
from torch.testing._internal import composite_compliance
from torch.testing._internal.two_tensor import TwoTensor

import batchnorm
from batchnorm import functional as bnf
from batchnorm.functional import use_backend
from tests.conftest import CPU_BACKENDS
from tests.tolerances import AGREEMENT, GRAD_AGREEMENT
from tests.torch_testing import BATCH_NORM_MODULES, BATCH_NORM_OP, ModuleErrorEnum

TARGETS = [("cpu", b) for b in CPU_BACKENDS] + (
    [("cuda", "native")] if torch.cuda.is_available() else []
)
OURS = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    nn.BatchNorm3d: batchnorm.BatchNorm3d,
    nn.SyncBatchNorm: batchnorm.SyncBatchNorm,
}

# The remaining differences (docs/differences.md, one row each): what ours does instead.
DIFFERENCES = {
    "momentum-outside-unit-interval": "a training step that updates running statistics with a "
    "momentum outside [0, 1] raises ValueError (torch extrapolates)",
    "empty-batch-not-counted": "an empty training batch does not count in num_batches_tracked "
    "(torch counts it, which shifts momentum=None's cumulative average)",
}


@pytest.fixture(params=TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def target(request):
    device, backend = request.param
    with use_backend(backend):
        yield device


@pytest.fixture(
    params=[
        pytest.param(t, marks=() if i == 0 or t[0] != "cpu" else pytest.mark.slow)
        for i, t in enumerate(TARGETS)
    ],
    ids=[f"{d}-{b}" for d, b in TARGETS],
)
def target_first_fast(request):
    """``target`` for expensive cases: the first CPU backend (and CUDA) always, the other CPU
    backends under the ``slow`` marker."""
    device, backend = request.param
    with use_backend(backend):
        yield device


def _close(actual, expected, dtype, grad=False, what=""):
    tol = (GRAD_AGREEMENT if grad else AGREEMENT)[dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial parameters and statistics (the defaults γ=1, β=0, μ=0, σ²=1 hide mistakes)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            values = torch.rand(t.shape, generator=gen, dtype=torch.float64)
            values = values + 0.5 if name.endswith(("weight", "running_var")) else values * 2 - 1
            t.copy_(values)


def _pair(torch_cls, *args, device="cpu", dtype=torch.float32, seed=0, **kwargs):
    ref = torch_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours = OURS[torch_cls](*args, **kwargs).to(device=device, dtype=dtype)
    _randomize(ref, torch.Generator().manual_seed(seed))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _signature(module: nn.Module) -> tuple:
    return (
        [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in module.named_parameters()],
        [(n, b.shape, b.dtype, b.device) for n, b in module.named_buffers()],
        list(module.state_dict()),
    )


def _memory_format(t: torch.Tensor) -> str:
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if t.dim() in (4, 5) and t.is_contiguous(memory_format=fmt):
            return str(fmt)
    return "contiguous" if t.is_contiguous() else "strided"


def run_both(ref: nn.Module, ours: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Forward (and backward where x or a parameter needs a gradient) ``steps`` times through
    both modules on the same values; outputs, layouts, gradients, buffers and parameters must
    agree (running statistics evolve over the steps: momentum, cumulative averages)."""
    dtype = x.dtype
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        xr = x.detach().clone().requires_grad_(x.requires_grad)
        xo = x.detach().clone().requires_grad_(x.requires_grad)
        yr = ref(xr)
        yo = ours(xo)
        assert (yo.shape, yo.dtype, yo.device) == (yr.shape, yr.dtype, yr.device)
        assert _memory_format(yo) == _memory_format(yr) or yo.numel() == 0
        _close(yo, yr, dtype, what=f"output, step {step}")
        if yr.requires_grad:
            g = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(yr)
            for m in (ref, ours):
                m.zero_grad(set_to_none=True)
            yr.backward(g)
            yo.backward(g.clone())
            if x.requires_grad:
                _close(xo.grad, xr.grad, dtype, grad=True, what="input gradient")
            for (n, pr), (_, po) in zip(
                ref.named_parameters(), ours.named_parameters(), strict=True
            ):
                assert (po.grad is None) == (pr.grad is None), n
                if pr.grad is not None:
                    _close(po.grad, pr.grad, pr.dtype, grad=True, what=f"{n} gradient")
        x = x * 1.5 + 0.25  # the next step sees other statistics
        empty_steps = step + 1 if ours.training and x.numel() == 0 else 0
        _compare_state(ref, ours, uncounted=empty_steps)


def _compare_state(ref: nn.Module, ours: nn.Module, uncounted: int = 0) -> None:
    """``uncounted``: empty training batches so far, which torch counts in num_batches_tracked
    and ours does not (DIFFERENCES["empty-batch-not-counted"])."""
    assert _signature(ours) == _signature(ref)
    for (n, br), (_, bo) in zip(ref.named_buffers(), ours.named_buffers(), strict=True):
        if br.is_floating_point():
            _close(bo, br, br.dtype, what=n)
        elif uncounted and n.endswith("num_batches_tracked"):
            assert int(bo) == int(br) - uncounted
        else:
            assert torch.equal(bo, br), n
    for (n, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        _close(po, pr, pr.dtype, what=n)


# -- PyTorch's ModuleInfo sample inputs (test_modules.py) ----------------------------------------


def _module_cases():
    for mi in BATCH_NORM_MODULES:
        for training in (True, False):
            for dtype in (torch.float64, torch.float32):
                inputs = mi.module_inputs_func(
                    mi, device="cpu", dtype=dtype, requires_grad=True, training=training
                )
                for i, mod_input in enumerate(inputs):
                    mode = "train" if training else "eval"
                    desc = mod_input.desc or "default"
                    yield pytest.param(
                        mi, training, dtype, i, id=f"{mi.name}-{desc}-{mode}-{str(dtype)[6:]}"
                    )


MODULE_CASES = list(_module_cases())


def _module_input(mi, training, dtype, index, device, requires_grad=True):
    torch.manual_seed(index)
    return mi.module_inputs_func(
        mi, device=device, dtype=dtype, requires_grad=requires_grad, training=training
    )[index]


def _module_pair(mi, mod_input, training, dtype, device):
    c = mod_input.constructor_input
    ref, ours = _pair(mi.module_cls, *c.args, device=device, dtype=dtype, **c.kwargs)
    ref.train(training)
    ours.train(training)
    return ref, ours


@pytest.mark.parametrize(("mi", "training", "dtype", "index"), MODULE_CASES)
def test_module_forward_backward_and_state(target, mi, training, dtype, index):
    """test_modules.py's test_forward (and the gradients and buffers after it)."""
    mod_input = _module_input(mi, training, dtype, index, target)
    ref, ours = _module_pair(mi, mod_input, training, dtype, target)
    assert repr(ours) == repr(ref)  # test_repr: torch's repr for torch's arguments
    run_both(ref, ours, mod_input.forward_input.args[0])


@pytest.mark.parametrize(("mi", "training", "dtype", "index"), MODULE_CASES)
def test_module_non_contiguous_and_channels_last_inputs(target, mi, training, dtype, index):
    """test_modules.py's test_non_contiguous_tensors and test_memory_format."""
    mod_input = _module_input(mi, training, dtype, index, target)
    x = mod_input.forward_input.args[0]
    variants = [x.repeat_interleave(2, dim=-1)[..., ::2]]  # the same values, strided
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        variants.append(x.detach().contiguous(memory_format=fmt).requires_grad_())
    for xv in variants:
        ref, ours = _module_pair(mi, mod_input, training, dtype, target)
        run_both(ref, ours, xv.detach().requires_grad_(x.requires_grad))


@pytest.mark.parametrize(("mi", "training", "dtype", "index"), MODULE_CASES[::2])
def test_module_pickle_deepcopy_and_state_dict_round_trips(target, mi, training, dtype, index):
    """test_modules.py's test_pickle, and state_dict loading both ways (strict)."""
    mod_input = _module_input(mi, training, dtype, index, target)
    _, ours = _module_pair(mi, mod_input, training, dtype, target)
    x = mod_input.forward_input.args[0].detach()
    for copy_of in (
        lambda m: pickle.loads(pickle.dumps(m)),
        copy.deepcopy,
        lambda m: _saved_and_loaded(m),
    ):
        twin = copy_of(ours)
        torch.testing.assert_close(twin(x), copy_of(ours)(x))
        assert _signature(twin) == _signature(ours)
    back = mi.module_cls(*mod_input.constructor_input.args, **mod_input.constructor_input.kwargs)
    back.to(device=target, dtype=dtype).load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(back.state_dict(), strict=True)


def _saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("mi", BATCH_NORM_MODULES, ids=lambda m: m.name)
def test_module_errors_as_torch(target, mi):
    """test_modules.py's test_errors: each error input raises at the same stage as in torch's
    layer, an instance of torch's exception class, with torch's message where torch's matches."""
    for training in (True, False):
        for error_input in mi.module_error_inputs_func(
            mi, device=target, dtype=torch.float32, requires_grad=False, training=training
        ):
            case = error_input.module_error_input
            outcome = {}
            for impl, cls in (("torch", mi.module_cls), ("ours", OURS[mi.module_cls])):
                stage = ModuleErrorEnum.CONSTRUCTION_ERROR
                try:
                    m = cls(*case.constructor_input.args, **case.constructor_input.kwargs)
                    m.train(training)
                    stage = ModuleErrorEnum.FORWARD_ERROR
                    m(*case.forward_input.args, **case.forward_input.kwargs)
                    outcome[impl] = None
                except Exception as error:
                    outcome[impl] = (stage, error)
            if outcome["torch"] is None:
                assert outcome["ours"] is None, outcome["ours"]
                continue
            stage, error = outcome["torch"]
            assert outcome["ours"] is not None, f"torch raised {error!r}, ours did not"
            assert outcome["ours"][0] == stage
            assert isinstance(outcome["ours"][1], type(error))
            if error_input.error_regex and pytest.importorskip("re").search(
                error_input.error_regex, str(error)
            ):
                assert pytest.importorskip("re").search(
                    error_input.error_regex, str(outcome["ours"][1])
                )


@pytest.mark.parametrize("mi", BATCH_NORM_MODULES, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_module_factory_kwargs_and_device_context(target, mi, dtype):
    """test_modules.py's test_factory_kwargs and test_device_ctx_init, test_to_empty."""
    for kw in ({}, dict(affine=False), dict(track_running_stats=False), dict(bias=False)):
        ref = mi.module_cls(3, device=target, dtype=dtype, **kw)
        ours = OURS[mi.module_cls](3, device=target, dtype=dtype, **kw)
        assert _signature(ours) == _signature(ref)
        with torch.device("meta"):
            ref_meta, ours_meta = (
                mi.module_cls(3, dtype=dtype, **kw),
                OURS[mi.module_cls](3, dtype=dtype, **kw),
            )
        assert _signature(ours_meta) == _signature(ref_meta)
        for m in (ref_meta, ours_meta):
            m.to_empty(device=target)
            m.reset_parameters()
        assert _signature(ours_meta) == _signature(ref_meta)
        _compare_state(ref_meta, ours_meta)


@pytest.mark.parametrize("mi", BATCH_NORM_MODULES, ids=lambda m: m.name)
def test_module_train_and_eval_differ_as_torchs(target, mi):
    """test_modules.py's test_if_train_and_eval_modes_differ."""
    for mod_input in mi.module_inputs_func(
        mi, device=target, dtype=torch.float64, requires_grad=False, training=True
    ):
        ref, ours = _module_pair(mi, mod_input, True, torch.float64, target)
        x = mod_input.forward_input.args[0]
        differ = {}
        for impl, m in (("torch", ref), ("ours", ours)):
            y_train = m(x)
            m.eval()
            differ[impl] = not torch.equal(m(x), y_train)
        assert differ["ours"] == differ["torch"]


GRAD_CASES = [c for c in MODULE_CASES if c.values[2] == torch.float64]


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize(("mi", "training", "dtype", "index"), GRAD_CASES)
def test_module_gradcheck_and_gradgradcheck(target, mi, training, dtype, index, full):
    """test_modules.py's test_grad and test_gradgrad, float64, with forward AD; ``full`` (slow)
    adds batched gradients (vmap over the backward) and forward-over-reverse, which cost ~10x."""
    if full and target == "cpu" and bnf.current_backend() != CPU_BACKENDS[0]:
        pytest.skip("the full tier (~3 s a case) runs on the first CPU backend only")
    mod_input = _module_input(mi, training, dtype, index, target)
    x = mod_input.forward_input.args[0]
    if x.numel() == 0:
        pytest.skip("no values: nothing to differentiate")
    _, ours = _module_pair(mi, mod_input, training, dtype, target)
    params = dict(ours.named_parameters())
    names = list(params)

    def fn(x, *ps):
        return torch.func.functional_call(ours, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params.values()))
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=full)
    assert torch.autograd.gradgradcheck(
        fn, inputs, check_fwd_over_rev=full, check_batched_grad=full
    )


# -- PyTorch's OpInfo samples of nn.functional.batch_norm (test_ops.py) ---------------------------

FN_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
assert set(FN_DTYPES) == set(BATCH_NORM_OP.supported_dtypes("cpu"))
N_SAMPLES = len(list(BATCH_NORM_OP.sample_inputs("cpu", torch.float32, requires_grad=True)))


def _samples(device, dtype, requires_grad=True):
    torch.manual_seed(0)
    return list(BATCH_NORM_OP.sample_inputs(device, dtype, requires_grad=requires_grad))


def _call(fn, sample):
    """fn(input, running_mean, running_var, weight, bias, **kwargs) on fresh copies; returns
    (output or exception, the running statistics after, the copies)."""
    x = sample.input.detach().clone().requires_grad_(sample.input.requires_grad)
    args = [
        None if a is None else a.detach().clone().requires_grad_(a.requires_grad)
        for a in sample.args
    ]
    try:
        out = fn(x, *args, **sample.kwargs)
    except Exception as error:
        return error, args[:2], (x, args)
    return out, args[:2], (x, args)


def _documented_difference(sample) -> str | None:
    momentum = sample.kwargs.get("momentum", 0.1)
    updates = sample.kwargs.get("training", False) and sample.args[0] is not None
    if updates and sample.input.numel() > 0 and not 0 <= momentum <= 1:
        return "momentum-outside-unit-interval"
    return None


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", FN_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_functional_sample(target, dtype, index, noncontiguous):
    """Each OpInfo sample (and its non-contiguous twin, as test_ops.py's test_noncontiguous_samples
    builds it): output, running statistics, gradients of input/weight/bias, errors."""
    sample = _samples(target, dtype)[index]
    if noncontiguous:
        sample = sample.noncontiguous()
    expected, stats_t, (xt, args_t) = _call(F.batch_norm, sample)
    got, stats_o, (xo, args_o) = _call(bnf.batch_norm, sample)
    difference = _documented_difference(sample)
    if difference == "momentum-outside-unit-interval":
        assert isinstance(got, ValueError) and "momentum must be in" in str(got)
        assert all(torch.equal(a, b) for a, b in zip(stats_o, sample.args[:2], strict=True))
        return
    if isinstance(expected, Exception):
        assert isinstance(got, type(expected)), f"torch raised {expected!r}; ours: {got!r}"
        return
    assert not isinstance(got, Exception), f"torch accepted the sample; ours raised {got!r}"
    assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
    _close(got, expected, dtype, what="output")
    for a, b in zip(stats_o, stats_t, strict=True):
        if b is not None:
            _close(a, b, b.dtype, what="running statistics")
    wrt_t = [t for t in (xt, *args_t[2:]) if t is not None and t.requires_grad]
    wrt_o = [t for t in (xo, *args_o[2:]) if t is not None and t.requires_grad]
    if expected.requires_grad and expected.numel() > 0:
        g = torch.randn_like(expected)
        for a, b in zip(
            torch.autograd.grad(got, wrt_o, g, allow_unused=True),
            torch.autograd.grad(expected, wrt_t, g, allow_unused=True),
            strict=True,
        ):
            assert (a is None) == (b is None)
            if b is not None:
                _close(a, b, b.dtype, grad=True, what="gradient")


def _differentiable(sample):
    def fn(x, *args):
        full = list(sample.args)
        for i, a in zip(positions, args, strict=True):
            full[i] = a
        return bnf.batch_norm(x, *full, **sample.kwargs)

    positions = [i for i in (2, 3) if sample.args[i] is not None]
    inputs = (sample.input, *(sample.args[i] for i in positions))
    return fn, inputs


@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_functional_gradcheck_gradgradcheck_and_forward_ad(target, index):
    """test_ops.py's test_fn_grad / test_fn_gradgrad / test_forward_mode_AD /
    test_fn_fwgrad_bwgrad on each float64 sample (the OpInfo declares all four)."""
    sample = _samples(target, torch.float64)[index]
    if sample.input.numel() == 0 or _documented_difference(sample):
        pytest.skip("no values to differentiate, or a documented difference")
    fn, inputs = _differentiable(sample)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True)


@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_functional_composite_compliance(target_first_fast, index):
    """test_ops.py's TestCompositeCompliance (test_operator, test_backward, test_forward_ad):
    every argument wrapped in CompositeCompliantTensor, in every combination, and under the
    composite-compliance mode; results equal to the plain call's. (About 5 s a case: the other
    backends run under the slow marker.)"""
    target = target_first_fast
    sample = _samples(target, torch.float64)[index]
    if _documented_difference(sample):
        pytest.skip("a documented difference (ours raises)")
    args = (sample.input, *sample.args)
    assert_equal = partial(torch.testing.assert_close, **AGREEMENT[torch.float64])
    composite_compliance.check_with_mode(bnf.batch_norm, args, sample.kwargs, assert_equal)
    composite_compliance.check_all_permutations(bnf.batch_norm, args, sample.kwargs, assert_equal)
    if sample.input.numel() > 0:
        composite_compliance.check_backward_formula(
            bnf.batch_norm, args, sample.kwargs, assert_equal_fn=assert_equal
        )
        composite_compliance.check_forward_ad_formula(
            bnf.batch_norm, args, sample.kwargs, assert_equal_fn=assert_equal
        )


# -- test_nn.py, TestNN ----------------------------------------------------------------------------

IMPLS = {"torch": nn, "ours": batchnorm}
BN = {impl: {n: getattr(mod, n) for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")} for impl, mod in IMPLS.items()}  # fmt: skip
FUNCTIONAL = {"torch": F.batch_norm, "ours": bnf.batch_norm}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    """Behavioural cases run on torch's implementation too: each must hold for both."""
    return request.param


def _nhwc_case(impl, cls_name, size, dtype, mixed, fmt, atol=None):
    channels = size[1]
    x = torch.randn(size, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(size, dtype=dtype).contiguous(memory_format=fmt)
    bn = BN[impl][cls_name](channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_x = x.detach().clone().contiguous().requires_grad_()
    ref_bn = BN[impl][cls_name](channels).to(dtype)
    ref_bn.load_state_dict(bn.state_dict())
    if mixed:
        bn.float()
        ref_bn.float()
    out = bn(x)
    out.backward(grad)
    ref_out = ref_bn(ref_x)
    ref_out.backward(grad.contiguous())
    assert out.is_contiguous(memory_format=fmt) and ref_out.is_contiguous()
    _close(out, ref_out, dtype, what="output")
    _close(bn.weight.grad, ref_bn.weight.grad, bn.weight.dtype, grad=True, what="dγ")
    _close(bn.bias.grad, ref_bn.bias.grad, bn.bias.dtype, grad=True, what="dβ")
    _close(x.grad, ref_x.grad, dtype, grad=True, what="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True])
def test_nn_batchnorm_nhwc_cpu(impl, dtype, mixed):
    if dtype == torch.float32 and mixed:
        pytest.skip("float32 is not mixed")
    for shape in [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]:
        _nhwc_case(impl, "BatchNorm2d", shape, dtype, mixed, torch.channels_last)
    for shape in [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)]:
        _nhwc_case(impl, "BatchNorm3d", shape, dtype, mixed, torch.channels_last_3d)


@pytest.mark.parametrize(
    ("cls_name", "size", "fmts"),
    [
        ("BatchNorm2d", (4, 4, 128, 128), (torch.contiguous_format, torch.channels_last)),
        ("BatchNorm3d", (2, 4, 16, 64, 64), (torch.contiguous_format, torch.channels_last_3d)),
    ],
)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
def test_nn_batchnorm_half_overflow(impl, cls_name, size, fmts, param_dtype):
    """TestNN.test_batchnorm_half_overflow at a smaller size that still overflows float16 sums
    (65536 values per channel; torch's original sizes take ~1 GB and are kept out of CI)."""
    for fwd_fmt in fmts:
        for bwd_fmt in fmts:
            x = torch.randn(size, dtype=torch.half).contiguous(memory_format=fwd_fmt)
            x.requires_grad_()
            bn = BN[impl][cls_name](size[1]).to(param_dtype)
            out = bn(x)
            ref_x = x.detach().clone().requires_grad_()
            ref_bn = BN[impl][cls_name](size[1]).float()
            ref_bn.load_state_dict(bn.float().state_dict())
            ref_out = ref_bn(ref_x)
            assert torch.isfinite(out).all()
            _close(out, ref_out, torch.float16, what="output")
            if param_dtype != torch.half:
                g = torch.rand(size).half().contiguous(memory_format=bwd_fmt)
                out.backward(g)
                ref_out.backward(g.clone())
                assert torch.isfinite(x.grad).all()
                _close(x.grad, ref_x.grad, torch.float16, grad=True, what="dx")


@pytest.mark.parametrize("cls_name", ["BatchNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nn_batchnorm_non_contig_cpu(impl, cls_name, dtype):
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = BN[impl][cls_name](2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out, ref_out = bn(x), ref_bn(x.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    x16 = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    bn_mix = BN[impl][cls_name](2).float().eval()
    torch.testing.assert_close(
        copy.deepcopy(bn_mix)(x16.float()), bn_mix(x16).float(), atol=0.05, rtol=0.05
    )


def test_nn_batchnorm_raises_error_if_less_than_one_value_per_channel(impl):
    with pytest.raises(ValueError):
        BN[impl]["BatchNorm1d"](10)(torch.rand(10)[None, :, None])


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_nn_batchnorm_raises_error_if_an_argument_is_not_the_input_size(impl, which):
    x = torch.rand(2, 10)
    for size in (9, 11):
        kw = dict(running_mean=torch.rand(10), running_var=torch.rand(10))
        kw[which] = Parameter(torch.rand(size)) if which in ("weight", "bias") else torch.rand(size)
        with pytest.raises(RuntimeError):
            FUNCTIONAL[impl](x, **kw)


def test_nn_batchnorm_raises_error_if_running_stats_have_forward_grad(impl):
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    fn = partial(FUNCTIONAL[impl], training=False, momentum=-1.2)
    for duals in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = [torch.rand_like(a) for a in args]
        with fwAD.dual_level():
            inputs = [
                fwAD.make_dual(a, t) if i in duals else a
                for i, (a, t) in enumerate(zip(args, tangents, strict=True))
            ]
            if 0 in duals and (1 in duals or 2 in duals):
                with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                    fn(*inputs)
            else:
                fn(*inputs)


@pytest.mark.parametrize("path", CPU_BACKENDS)
def test_nn_batchnorm_buffer_update_when_stats_are_not_tracked(impl, path):
    bn = BN[impl]["BatchNorm1d"](4, track_running_stats=True)
    bn.track_running_stats = False  # use the buffers for nothing, update none
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with use_backend(path):
        bn(torch.rand(32, 4))
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


def test_nn_batchnorm_load_state_dict(impl):
    bn = BN[impl]["BatchNorm2d"](3)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty = OrderedDict()
    bn.load_state_dict(empty, strict=False)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    with torch.device("meta"):
        meta_bn = BN[impl]["BatchNorm2d"](3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty, assign=True, strict=False)
    assert meta_bn.state_dict()["num_batches_tracked"] == torch.tensor(0)


# -- test_nn.py, TestNNDeviceType ------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_nn_batchnorm_grad(target, training):
    """_test_batchnorm_grad: gradcheck and gradgradcheck of F.batch_norm, eps = 1e-4."""
    dt = torch.float64
    x = torch.arange(120, device=target, dtype=dt).view(4, 5, 6).requires_grad_()
    w = torch.arange(1, 6, device=target, dtype=dt).requires_grad_()
    b = torch.arange(5, device=target, dtype=dt).requires_grad_()
    rm = 1 - torch.arange(5, device=target, dtype=dt)
    rv = 2 * torch.arange(5, device=target, dtype=dt)

    def fn(x, w, b):
        return bnf.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-4)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("ndim", [2, 3])
def test_nn_batchnorm_eval(impl, target, ndim):
    module = BN[impl]["BatchNorm1d"](3).to(target).eval()
    data = torch.rand([3] * ndim, device=target, requires_grad=True)
    grad = torch.rand([3] * ndim, device=target)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert torch.equal(res1, res2) and torch.equal(grad1, data.grad)
    module = BN[impl]["BatchNorm1d"](3, track_running_stats=False).to(target)
    data = torch.rand(4, 3, device=target, requires_grad=True)
    grad = torch.rand(4, 3, device=target)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert torch.equal(res1, res2) and torch.equal(grad1, data.grad)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nn_batchnorm_affine(impl, target, ndim):
    module = BN[impl]["BatchNorm1d"](3, affine=False).to(target)
    affine = BN[impl]["BatchNorm1d"](3, affine=True).to(target)
    data = torch.rand([3] * ndim, device=target, requires_grad=True)
    grad = torch.ones_like(data)
    res1 = affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)


def test_nn_batchnorm_simple_average(impl, target):
    module = BN[impl]["BatchNorm1d"](3, momentum=None).to(target)
    zeros, ones = torch.zeros(3, device=target), torch.ones(3, device=target)
    data1, data2 = torch.rand(4, 3, device=target), torch.rand(4, 3, device=target)
    res1 = module(data1)
    rm1, rv1 = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(rm1, zeros) and not torch.equal(rv1, ones)
    module.reset_running_stats()
    assert torch.equal(module.running_mean, zeros) and torch.equal(module.running_var, ones)
    res2 = module(data2)
    rm2, rv2 = module.running_mean.clone(), module.running_var.clone()
    module.reset_running_stats()
    res3, res4 = module(data1), module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (rm1 + rm2) / 2)
    torch.testing.assert_close(module.running_var, (rv1 + rv2) / 2)


def test_nn_batchnorm_update_stats(impl, target):
    module = BN[impl]["BatchNorm1d"](3).to(target)
    data = torch.rand(4, 3, device=target)
    old = {k: v.clone() for k, v in module.state_dict().items()}
    module(data)
    assert not torch.equal(old["running_mean"], module.running_mean)
    assert not torch.equal(old["running_var"], module.running_var)
    assert int(module.num_batches_tracked) == 1
    module.eval()
    old = {k: v.clone() for k, v in module.state_dict().items()}
    module(data)
    assert all(torch.equal(v, old[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("path", [*CPU_BACKENDS, "auto"])
@pytest.mark.parametrize("inference", [False, True])
def test_nn_batchnorm_empty(impl, path, inference):
    """test_batchnorm_empty through _test_module_empty_input: an empty output of the input's size,
    zero gradients for every parameter and for the input ("auto": the layers' own fast path)."""
    mod = BN[impl]["BatchNorm2d"](3)
    mod(torch.randn(4, 3, 2, 2))  # kernels loaded and used once
    if inference:
        mod.eval()
    inp = torch.randn(0, 3, 2, 2, requires_grad=True)
    with use_backend(path) if path != "auto" else torch.enable_grad():
        out = mod(inp)
        out.backward(torch.rand_like(out))
    assert out.size() == inp.size()
    for p in mod.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p.grad))
    assert torch.equal(inp.grad, torch.zeros_like(inp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only cases of test_nn.py")
@pytest.mark.parametrize("dtype", [torch.float, torch.half])
def test_nn_batchnorm_large_batch_cuda(impl, dtype):
    bn = BN[impl]["BatchNorm2d"](1).to("cuda", dtype)
    bn(torch.rand(880801, 1, 1, 1, device="cuda", dtype=dtype)).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only cases of test_nn.py")
def test_nn_batchnorm_nonaffine_cuda_half_input_and_nhwc_cuda(impl):
    x = torch.randn(16, 3, 24, 24, dtype=torch.half, device="cuda")
    m = BN[impl]["BatchNorm2d"](3, affine=False).cuda().float()
    assert m(x).dtype == torch.half and m.eval()(x).dtype == torch.half
    for dtype in (torch.half, torch.float):
        model = BN[impl]["BatchNorm2d"](64).eval().cuda().to(dtype)
        a = torch.randn(2, 64, 50, 50, device="cuda", dtype=dtype)
        assert torch.equal(model(a), model(a.contiguous(memory_format=torch.channels_last)))


# -- test/nn/test_load_state_dict.py -------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["no-swap", "swap"])
def swap(request):
    """test_load_state_dict.py's @swap: torch.__future__'s swap_module_params_on_conversion."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(old)


def test_load_state_dict_of_a_net_with_bn(impl, swap):
    net = nn.Module()
    net.linear = nn.Linear(5, 5)
    net.bn = BN[impl]["BatchNorm2d"](2)
    sd = net.state_dict()
    sd["bn.running_mean"] = torch.randn(2)
    incompatible = net.load_state_dict(sd)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert torch.equal(net.bn.running_mean, sd["bn.running_mean"])
    sd = net.state_dict()
    sd["bn.running_mean"] = torch.rand(14, 4)  # wrong size
    with pytest.raises(RuntimeError):
        net.load_state_dict(sd)
    with pytest.raises(RuntimeError):
        net.load_state_dict(sd, strict=False)


def test_load_state_dict_bc_num_batches_tracked(impl, swap):
    bn = BN[impl]["BatchNorm2d"](3)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.dtype == torch.long and int(bn.num_batches_tracked) == 0
    del sd._metadata[""]["version"]
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


class _Net(nn.Module):
    def __init__(self, impl: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = BN[impl]["BatchNorm1d"](5)
        self.x = nn.Parameter(torch.rand(5), requires_grad=False)

    def forward(self, input):
        return self.x + self.bn(self.fc1(input))


@pytest.mark.parametrize("keep_vars", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_load_state_dict_assign_meta(impl, swap, keep_vars, training):
    """The meta-device path of issue 18 item 2: outputs equal to the model it was loaded from, in
    training too (torch's test runs training mode)."""
    net = _Net(impl)
    sd = net.state_dict(keep_vars=keep_vars)
    for v in sd.values():
        v.requires_grad_(False)
    with torch.device("meta"):
        net_meta = _Net(impl)
    old = net_meta.state_dict(keep_vars=True)
    net_meta.load_state_dict(sd, assign=True)
    new = net_meta.state_dict(keep_vars=True)
    for key in sd:
        if key in net_meta._parameters:
            assert old[key].requires_grad == new[key].requires_grad
        torch.testing.assert_close(sd[key], new[key])
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in net_meta.named_parameters()]
    assert [n for n, _ in net.named_buffers()] == [n for n, _ in net_meta.named_buffers()]
    net.train(training)
    net_meta.train(training)
    t = torch.randn(4, 3)
    torch.testing.assert_close(net(t), net_meta(t.clone()))


def test_load_state_dict_assign_with_optimizer(impl, swap):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5)
            self.bn = BN[impl]["BatchNorm1d"](5)

        def forward(self, input):
            return self.bn(self.fc1(input))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1000)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    opt_sd, net_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    with torch.device("meta"):
        net_meta = Net()
    net_meta.load_state_dict(net_sd, assign=True)
    opt2 = torch.optim.Adam(net_meta.parameters(), lr=1000)
    opt2.load_state_dict(opt_sd)
    y = x.clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
        opt2.zero_grad()
        net_meta(y).sum().backward()
        opt2.step()
    assert str(opt.state_dict()) == str(opt2.state_dict())
    for (k, a), (k2, b) in zip(
        net.state_dict().items(), net_meta.state_dict().items(), strict=True
    ):
        assert k == k2
        torch.testing.assert_close(a, b)


def test_load_state_dict_assign_shape_stride(impl, swap):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5)
            self.bn = BN[impl]["BatchNorm1d"](5)

    sd = Net().state_dict()
    sd["bn.running_mean"] = torch.randn(10)[::2]  # strided: allowed with assign
    sd["fc1.weight"] = torch.randn(3, 5).transpose(0, 1)
    net2 = Net()
    net2.load_state_dict(sd, strict=False, assign=True)
    net2.train()
    net2.bn(torch.randn(4, 5))  # trains on the strided buffer
    sd["bn.running_mean"] = torch.randn(4)
    with pytest.raises(RuntimeError, match=r"size mismatch for bn\.running_mean"):
        net2.load_state_dict(sd, strict=False, assign=True)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_swap_subclass_into_bn(impl, assign):
    """test_load_state_dict.py's TestLoadStateDictSwap with a BN layer: a checkpoint of
    __torch_dispatch__ wrapper tensors (TwoTensor) loaded into the layer, then a training step:
    PyTorch's path for ours, torch's result."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        src = BN[impl]["BatchNorm1d"](3)
        sd = {k: TwoTensor(v, v.clone()) for k, v in src.state_dict().items()}
        m = BN[impl]["BatchNorm1d"](3)
        m.load_state_dict(sd, assign=assign)
        assert isinstance(m.weight, Parameter)
        x = torch.randn(4, 3)
        x = TwoTensor(x, x.clone())
        y = m(x)
        y.sum().backward()
        expected = nn.BatchNorm1d(3)(x.a)
        torch.testing.assert_close(y.a if isinstance(y, TwoTensor) else y, expected)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
