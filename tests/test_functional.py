"""Every training-mode code path against the float64 reference of Algorithm 1 and Section 3."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchnorm.functional import (
    BatchNormFunction,
    batch_norm,
    batch_norm_train,
    kernels,
    reference,
    select_backend,
    use_backend,
)
from tests.conftest import CPU_BACKENDS, kernels_required
from tests.tolerances import GRAD_F32, STATS_RTOL_F32, TOL

SHAPES = [
    (2, 1),  # m = 2, C = 1: the smallest legal batch
    (60, 100),  # the MNIST MLP's layer
    (7, 3, 1),  # (N, C, L) with L = 1: rows layout through the 1-d path
    (5, 4, 9),
    (3, 5, 7, 7),
    (2, 3, 4, 5, 6),
    (1, 2, 3, 3),  # N = 1 is fine for convolutional inputs: m = 9
    (4, 1, 1000),  # one channel, 1,000 values per map
    (300, 2, 200),  # few channels, large m: one channel per thread (test_kernels.PATHS: chunks)
]


def _memory_formats(shape):
    yield "contiguous", None
    if len(shape) == 4:
        yield "channels_last", torch.channels_last
    if len(shape) == 5:
        yield "channels_last_3d", torch.channels_last_3d
    if len(shape) >= 3:
        yield "transposed", "transposed"


def _make(shape, fmt, dtype=torch.float64, scale=3.0, offset=5.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    if fmt == "transposed":  # a non-contiguous view with the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not x.is_contiguous()
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_reference_float64(backend, shape):
    for fmt_name, fmt in _memory_formats(shape):
        x = _make(shape, fmt)
        c = shape[1]
        w = torch.randn(c, dtype=torch.float64)
        b = torch.randn(c, dtype=torch.float64)
        g = torch.randn(shape, dtype=torch.float64)
        y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, w, b, 1e-5)
        dx_ref, dw_ref, db_ref = reference.batch_norm_backward(g, x, w, 1e-5)

        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y, mean, var = batch_norm_train(xs, ws, bs, eps=1e-5)
        y.backward(g)
        msg = f"{backend} {shape} {fmt_name}"
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64], msg=msg)
        torch.testing.assert_close(mean, mean_ref, **TOL[torch.float64], msg=msg)
        torch.testing.assert_close(var, var_ref, **TOL[torch.float64], msg=msg)
        torch.testing.assert_close(xs.grad, dx_ref, **TOL[torch.float64], msg=msg)
        torch.testing.assert_close(ws.grad, dw_ref, **TOL[torch.float64], msg=msg)
        torch.testing.assert_close(bs.grad, db_ref, **TOL[torch.float64], msg=msg)
        if fmt in (torch.channels_last, torch.channels_last_3d):
            assert y.is_contiguous(memory_format=fmt), f"{msg}: output lost the memory format"


@given(
    n=st.integers(1, 9),
    c=st.integers(1, 12),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    offset=st.sampled_from([0.0, -7.0, 1e3]),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(CPU_BACKENDS),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_inputs_match_reference(
    n, c, spatial, scale, offset, affine, dtype, backend, channels_last, seed
):
    torch.manual_seed(seed)  # the values are part of the example: failures replay exactly
    shape = (n, c, *spatial)
    if n * max(1, int(torch.tensor(spatial).prod()) if spatial else 1) < 2:
        n, shape = 2, (2, c, *spatial)
    x64 = torch.randn(shape, dtype=torch.float64) * scale + offset
    x = x64.to(dtype)
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    g = torch.randn(shape, dtype=dtype)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    if channels_last and fmt is not None:  # the rows layout (its vector lanes and scalar tail)
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    ref_in = x.double()  # the reference sees the same (rounded) values
    w64 = w.double() if affine else None
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(
        ref_in, w64, b.double() if affine else None, 1e-5
    )
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(g.double(), ref_in, w64, 1e-5)
    xs = x.clone().requires_grad_()
    ws = w.clone().requires_grad_() if affine else None
    bs = b.clone().requires_grad_() if affine else None
    with use_backend(backend):
        y, mean, var = batch_norm_train(xs, ws, bs, eps=1e-5)
        y.backward(g)
    # Any computation of x - mean carries an error of (machine eps)·|mean|/std relative to the
    # output, the reference's float64 included. PyTorch's own float32 kernels ("native") subtract
    # a float32 mean; ours (fused, python) compute it in float64 (see the large-offset test).
    compute = torch.float32 if (backend == "native" and dtype == torch.float32) else torch.float64
    # the conditioning of this batch: |mean| over the smallest per-channel std actually drawn
    std_min = max(float(var_ref.min().sqrt()), 1e-30)
    floor = 16 * torch.finfo(compute).eps * (1 + (abs(offset) + 3 * scale) / std_min)
    tol = {k: max(v, floor) for k, v in TOL[dtype].items()}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(mean, mean_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(var, var_ref, rtol=tol["rtol"], atol=tol["atol"] * scale**2)
    # dx scales like 1/σ; compare relative to the largest reference value.
    gtol = GRAD_F32 if dtype == torch.float32 else TOL[torch.float64]
    gtol = {k: max(v, 4 * tol[k]) for k, v in gtol.items()}
    big = max(1.0, float(dx_ref.abs().max()))
    if backend == "native":
        # PyTorch's float32 backward rounds terms of size ~γ/σ before they cancel (e.g. m = 2
        # values that nearly coincide): its error scales with 1/σ.
        big = max(big, float((var_ref + 1e-5).rsqrt().max()) * scale)
    torch.testing.assert_close(xs.grad.double(), dx_ref, rtol=gtol["rtol"], atol=gtol["atol"] * big)
    if affine:
        gbig = max(1.0, float(dw_ref.abs().max()), float(db_ref.abs().max()))
        torch.testing.assert_close(
            ws.grad.double(), dw_ref, rtol=gtol["rtol"], atol=gtol["atol"] * gbig
        )
        torch.testing.assert_close(
            bs.grad.double(), db_ref, rtol=gtol["rtol"], atol=gtol["atol"] * gbig
        )


@pytest.mark.parametrize(
    "shape", [(2, 1), (4, 3), (3, 2, 5), (2, 3, 2, 3), (2, 2, 2, 2, 2)], ids=str
)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(backend, shape, affine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if affine:
        w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        inputs = (x, w, b)

        def f(x, w, b):
            return batch_norm_train(x, w, b).output
    else:
        inputs = (x,)

        def f(x):
            return batch_norm_train(x).output

    # forward mode too (torch.func.jvp, jacfwd): the kernels' autograd must not drop tangents
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True)


def test_gradgradcheck_channels_last(backend):
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batch_norm_train(x, w, b).output

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["contiguous", "channels_last"])
def test_torch_func_transforms_match_the_reference(backend, fmt):
    """jvp, a Hessian-vector product (forward over reverse) and vjp of a gradient, in float32,
    against the same transforms of the float64 reference."""
    x = (torch.randn(6, 3, 4, 5) * 2 + 3).contiguous(memory_format=fmt or torch.contiguous_format)
    w, b = torch.randn(3), torch.randn(3)
    t, v = torch.randn_like(x), torch.randn_like(x)

    def f(x, w, b):
        return batch_norm_train(x, w, b).output

    def ref(x, w, b):
        return reference.batch_norm_forward(x, w, b, 1e-5)[0]

    def loss(fn):
        return lambda x: (fn(x, w.to(x.dtype), b.to(x.dtype)) ** 3).sum()

    d = [a.double() for a in (x, w, b, t)]
    _, y_t = torch.func.jvp(f, (x, w, b), (t, w.flip(0), b.flip(0)))
    _, y_t_ref = torch.func.jvp(ref, tuple(d[:3]), (d[3], d[1].flip(0), d[2].flip(0)))
    torch.testing.assert_close(y_t.double(), y_t_ref, **GRAD_F32)
    _, hv = torch.func.jvp(torch.func.grad(loss(f)), (x,), (v,))
    _, hv_ref = torch.func.jvp(torch.func.grad(loss(ref)), (d[0],), (v.double(),))
    scale = float(hv_ref.abs().max())
    torch.testing.assert_close(hv.double(), hv_ref, rtol=1e-4, atol=1e-4 * scale)
    hv_rev = torch.func.vjp(torch.func.grad(loss(f)), x)[1](v)[0]
    torch.testing.assert_close(hv_rev.double(), hv_ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("backend_name", ["auto", "python", "native"])
def test_vmap_gives_per_sample_statistics(backend_name):
    """torch.func.vmap over a batch of batches (torch.func's model ensembling, per-sample
    statistics): the fused kernels have no batching rule, so "auto" takes the portable path."""
    xs = torch.randn(4, 6, 3, 5, dtype=torch.float64) * 2 + 1
    w = torch.randn(3, dtype=torch.float64)
    with use_backend(backend_name):
        ys = torch.func.vmap(lambda x: batch_norm_train(x, w).output)(xs)
        ws = torch.stack([w, -w, 2 * w, w + 1])
        yw = torch.func.vmap(lambda w: batch_norm_train(xs[0], w).output)(ws)
    for i in range(4):
        torch.testing.assert_close(ys[i], reference.batch_norm_forward(xs[i], w, None, 1e-5)[0])
        torch.testing.assert_close(yw[i], reference.batch_norm_forward(xs[0], ws[i], None, 1e-5)[0])


def test_gradient_penalty_runs_through_double_backward(backend):
    """A gradient penalty ||dL/dx||² needs the backward to be differentiable (create_graph)."""
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = batch_norm_train(x, w).output
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    penalty = (gx**2).sum()
    penalty.backward()
    # the same penalty through the reference (plain autograd of Alg. 1) gives the same dw
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    y2 = reference.batch_norm_forward(x2, w2, None, 1e-5)[0]
    (gx2,) = torch.autograd.grad((y2**3).sum(), x2, create_graph=True)
    (gx2**2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float64])


@pytest.mark.parametrize("grads", ["x", "w", "b", "xw", "xb", "wb", "xwb"])
def test_backward_returns_exactly_the_gradients_asked_for(backend, grads):
    """Each of x, γ, β may or may not require a gradient; each one asked for matches the
    reference, and nothing else gets a gradient."""
    x0 = _make((6, 3, 4), None)
    w0, b0 = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x, w, b = (t.clone().requires_grad_(k in grads) for t, k in ((x0, "x"), (w0, "w"), (b0, "b")))
    g = torch.randn_like(x0)
    out = batch_norm_train(x, w, b)
    assert not out.mean.requires_grad and not out.var.requires_grad
    out.output.backward(g)
    xr, wr, br = (t.clone().requires_grad_() for t in (x0, w0, b0))
    reference.batch_norm_forward(xr, wr, br, 1e-5)[0].backward(g)
    for t, ref, k in ((x, xr, "x"), (w, wr, "w"), (b, br, "b")):
        if k in grads:
            torch.testing.assert_close(t.grad, ref.grad, **TOL[torch.float64])
        else:
            assert t.grad is None


def test_backward_keeps_autograd_contracts(backend):
    """What every autograd op owes its users: an in-place change to a saved input is an error,
    a freed graph cannot be run twice, and saved-tensor hooks see what is saved."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = batch_norm_train(x2 * 1, w).output  # x2 * 1: a non-leaf that may be changed in place
    y2 = batch_norm_train(x, w).output
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()

    y = batch_norm_train(x, w).output
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = batch_norm_train(x, w).output
    assert torch.Size([5, 3]) in packed and torch.Size([3]) in packed
    (gx,) = torch.autograd.grad((y**2).sum(), x)
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad((reference.batch_norm_forward(xr, w, None, 1e-5)[0] ** 2).sum(), xr)
    torch.testing.assert_close(gx, gr, **TOL[torch.float64])


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("shape", [(256, 8), (16, 4, 6, 6)], ids=str)
def test_large_offsets_no_catastrophic_cancellation(offset, shape):
    """float32 1e4 + N(0, 1) and 1e6 + N(0, 1): statistics and outputs match the float64 reference
    on the same values, where the textbook one-pass formula does not."""
    x = (torch.randn(shape, dtype=torch.float64) + offset).float()
    x64 = x.double()
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x64, None, None, 1e-5)
    # The naive E[x²] − E[x]² in float32 is badly wrong here: this test can fail.
    dims = reference.reduce_dims(x)
    naive = (x * x).mean(dims) - x.mean(dims) ** 2
    assert (naive.double() - var_ref).abs().max() > 0.1 * var_ref.max()
    for name in ["fused", "python"]:
        if name not in CPU_BACKENDS:  # the kernels did not build (and are not required)
            continue
        with use_backend(name):
            y, mean, var = batch_norm_train(x)
        torch.testing.assert_close(mean, mean_ref, rtol=STATS_RTOL_F32, atol=0, msg=name)
        torch.testing.assert_close(var, var_ref, rtol=STATS_RTOL_F32, atol=0, msg=name)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 8), (4, 3, 5, 5)], ids=str)
def test_half_precision_inputs_accumulate_in_float32(backend, dtype, shape):
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    w = torch.randn(shape[1])  # float32 parameters beside 16-bit activations (AMP)
    b = torch.randn(shape[1])
    g = torch.randn(shape).to(dtype)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(
        x.double(), w.double(), b.double(), 1e-5
    )
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(g.double(), x.double(), w.double(), 1e-5)
    xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y, mean, var = batch_norm_train(xs, ws, bs)
    y.backward(g)
    assert y.dtype == dtype and xs.grad.dtype == dtype
    assert ws.grad.dtype == torch.float32 and bs.grad.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    # statistics are accumulated in (at least) float32: far better than 16-bit precision
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=1e-5)
    big = float(dx_ref.abs().max())
    torch.testing.assert_close(xs.grad.double(), dx_ref, rtol=tol["rtol"], atol=tol["atol"] * big)
    torch.testing.assert_close(
        ws.grad.double(), dw_ref, rtol=1e-2, atol=1e-2 * float(dw_ref.abs().max())
    )
    torch.testing.assert_close(
        bs.grad.double(), db_ref, rtol=1e-2, atol=1e-2 * float(db_ref.abs().max())
    )


def test_channels_last_and_contiguous_give_the_same_result(backend):
    x = torch.randn(4, 6, 5, 5)
    w, b = torch.randn(6), torch.randn(6)
    y1 = batch_norm_train(x, w, b).output
    y2 = batch_norm_train(x.contiguous(memory_format=torch.channels_last), w, b).output
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_statistics_follow_torch_rule(backend, momentum):
    shape = (6, 3, 4)
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 0.5, torch.tensor(0)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(1, 5):
        x = torch.randn(shape) * step + step
        batch_norm_train(
            x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, momentum=momentum
        )
        factor = momentum if momentum is not None else 1.0 / step
        F.batch_norm(x, rm_t, rv_t, training=True, momentum=factor)
        torch.testing.assert_close(rm, rm_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv, rv_t, rtol=1e-6, atol=1e-6)
    assert int(nbt) == 4


def test_running_statistics_in_a_different_dtype(backend):
    x = torch.randn(8, 3).to(torch.bfloat16)
    rm, rv = torch.zeros(3), torch.ones(3)  # float32 buffers for a bf16 activation (AMP)
    batch_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0)
    mean_ref = x.double().mean(0)
    var_ref = x.double().var(0, correction=1)
    torch.testing.assert_close(rm.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), var_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_never_reaches_running_stats(backend, bad):
    rm, rv, nbt, count = torch.zeros(3), torch.ones(3), torch.tensor(0), torch.tensor(0)
    x = torch.randn(5, 3)
    x[2, 1] = bad
    with pytest.warns(UserWarning, match="layer7: the batch statistics .* not finite"):
        batch_norm_train(
            x,
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            nonfinite_count=count,
            name="layer7",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second skip is counted, not warned
        batch_norm_train(
            x,
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            nonfinite_count=count,
            name="layer7",
        )
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert int(nbt) == 0 and int(count) == 2
    # a finite batch afterwards updates normally
    batch_norm_train(
        torch.randn(5, 3),
        running_mean=rm,
        running_var=rv,
        num_batches_tracked=nbt,
        nonfinite_count=count,
    )
    assert int(nbt) == 1 and bool(torch.isfinite(rm).all()) and not torch.equal(rm, torch.zeros(3))


def test_guard_can_be_turned_off(backend):
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(5, 3)
    x[0, 0] = float("nan")
    batch_norm_train(x, running_mean=rm, running_var=rv, guard_nonfinite=False)
    assert torch.isnan(rm[0]) and torch.isnan(rv[0])


def test_fp16_overflow_is_caught():
    """An fp16 activation that overflowed to inf upstream must not poison running_var."""
    x = torch.full((4, 2), 60000.0, dtype=torch.float16)
    x[0, 0] = float("inf")
    rm, rv = torch.zeros(2), torch.ones(2)
    with pytest.warns(UserWarning, match="not finite"):
        batch_norm_train(x, running_mean=rm, running_var=rv)
    assert torch.equal(rv, torch.ones(2))


def test_functional_batch_norm_matches_torch(backend):
    x = torch.randn(6, 4, 3)
    w, b = torch.randn(4), torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    y = batch_norm(x, rm, rv, w, b, training=False)
    torch.testing.assert_close(y, F.batch_norm(x, rm_t, rv_t, w, b, training=False))


def test_functional_batch_norm_takes_what_torch_takes(backend):
    """Strided running buffers (views into a larger state) are updated in place, and an empty
    batch gives an empty output and leaves them alone, as F.batch_norm does."""
    x, w, b = torch.randn(6, 4, 3) * 2 + 1, torch.randn(4), torch.randn(4)
    state = torch.stack([torch.zeros(4), torch.ones(4)], dim=1)  # columns: strided views
    state_t = state.clone()
    rm, rv, rm_t, rv_t = state[:, 0], state[:, 1], state_t[:, 0], state_t[:, 1]
    assert not rm.is_contiguous()
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    torch.testing.assert_close(
        y, F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(state, state_t)
    assert not torch.equal(state[:, 0], torch.zeros(4))
    empty = torch.randn(0, 4, 3)
    y = batch_norm(empty, rm, rv, w, b, training=True, momentum=0.3)
    assert y.shape == empty.shape
    torch.testing.assert_close(state, state_t)


def test_inference_mode_is_algorithm_2_line_11():
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = batch_norm(x, mean, var, w, b, training=False, eps=1e-3)
    torch.testing.assert_close(y, reference.batch_norm_inference(x, mean, var, w, b, 1e-3))


@pytest.mark.parametrize("shape", [(2, 5), (3, 4, 6), (2, 3, 5, 5)], ids=str)
def test_per_channel_output_is_normalized(backend, shape):
    """Alg. 1 property: with γ = 1, β = 0 each channel has mean 0 and biased variance σ²/(σ² + ε)."""
    x = torch.randn(shape, dtype=torch.float64) * 4 - 2
    y, _, var = batch_norm_train(x, eps=1e-5)
    dims = reference.reduce_dims(x)
    torch.testing.assert_close(
        y.mean(dims), torch.zeros(shape[1], dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(y.var(dims, correction=0), var / (var + 1e-5), atol=1e-12, rtol=0)


def test_scale_invariance_section_3_3(backend):
    """BN(a·Wu) = BN(Wu), and the gradient w.r.t. the scaled weights is 1/a times smaller."""
    u = torch.randn(16, 5, dtype=torch.float64)
    W = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    a = 7.5
    Wa = (a * W.detach()).requires_grad_()
    g = torch.randn(16, 3, dtype=torch.float64)
    y1 = batch_norm_train(u @ W, eps=0.0 + 1e-12).output
    y2 = batch_norm_train(u @ Wa, eps=0.0 + 1e-12).output
    torch.testing.assert_close(y1, y2, rtol=1e-8, atol=1e-8)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(Wa.grad, W.grad / a, rtol=1e-7, atol=1e-9)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_train(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm_train(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point input"):
        batch_norm_train(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps must be positive during training"):  # torch's words
        batch_norm_train(torch.randn(4, 3), eps=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        batch_norm_train(torch.randn(4, 3), running_mean=torch.zeros(3), momentum=1.5)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_backend_selection():
    x = torch.randn(4, 3)
    with use_backend("python"):
        assert select_backend(x) == "python"
    with use_backend("native"):
        assert select_backend(x) == "native"
    with pytest.raises(ValueError, match="unknown batchnorm backend"), use_backend("gpu-magic"):
        pass
    assert select_backend(torch.empty(4, 3, device="meta")) == "native"


def test_fused_kernels_are_built_when_required():
    """CI sets BATCHNORM_KERNELS=require: the fast path must really be running there."""
    if not kernels_required():
        pytest.skip("BATCHNORM_KERNELS is not 'require'")
    assert kernels.available(), kernels.status()
    assert select_backend(torch.randn(2, 2)) == "fused"


def test_portable_function_saves_only_x_mean_invstd():
    x = torch.randn(6, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    y, _, _ = BatchNormFunction.apply(x, w, None, 1e-5)
    saved = y.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [x.shape, w.shape, (3,), (3,)]
