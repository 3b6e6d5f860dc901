"""The four split steps (moments, normalize, backward_reduce, backward_elementwise)."""

import pytest
import torch

from batchnorm.functional import (
    Moments,
    backward_elementwise,
    backward_reduce,
    batch_norm_train,
    merge_moments,
    moments,
    normalize,
    reference,
)
from tests.tolerances import TOL

CASES = [
    ((6, 4), None),
    ((5, 3, 7), None),
    ((4, 3, 5, 5), None),
    ((4, 3, 5, 5), torch.channels_last),
    ((2, 3, 2, 3, 4), torch.channels_last_3d),
    ((3, 1, 40000), None),
]
IDS = ["2d", "ncl", "nchw", "nhwc", "ndhwc", "one-channel-large"]


def _x(shape, fmt, dtype=torch.float64):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    return (x.contiguous(memory_format=fmt) if fmt else x).to(dtype)


@pytest.mark.parametrize(("shape", "fmt"), CASES, ids=IDS)
def test_steps_match_the_reference(backend, shape, fmt):
    x = _x(shape, fmt)
    c = shape[1]
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, w, b, 1e-5)
    dx_ref, _, _ = reference.batch_norm_backward(g, x, w, 1e-5)
    mean, var = moments(x)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, mean_ref, **TOL[torch.float64])
    torch.testing.assert_close(var, var_ref, **TOL[torch.float64])
    y = normalize(x, mean, var, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    sum_g, sum_gc = backward_reduce(g, x, mean)
    dims = reference.reduce_dims(x)
    torch.testing.assert_close(sum_g, g.sum(dims), **TOL[torch.float64])
    torch.testing.assert_close(
        sum_gc,
        (g * (x - mean.reshape(1, -1, *[1] * (x.dim() - 2)))).sum(dims),
        **TOL[torch.float64],
    )
    dx = backward_elementwise(g, x, mean, var, w, sum_g, sum_gc, x.numel() // c, 1e-5)
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])


@pytest.mark.parametrize(("shape", "fmt"), CASES, ids=IDS)
def test_steps_compose_to_the_one_call_path_exactly(backend, shape, fmt):
    x = _x(shape, fmt, torch.float32)
    c = shape[1]
    w, b = torch.randn(c), torch.randn(c)
    g = torch.randn(shape)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1, mean1, var1 = batch_norm_train(xs, ws, b)
    y1.backward(g)
    mean, var = moments(x)
    y = normalize(x, mean, var, w, b, 1e-5)
    sum_g, sum_gc = backward_reduce(g, x, mean)
    dx = backward_elementwise(g, x, mean, var, w, sum_g, sum_gc, x.numel() // c, 1e-5)
    # the one-call native path is PyTorch's float32 kernel: close, not equal
    if backend == "native":
        torch.testing.assert_close(mean, mean1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, var1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
    else:  # the same kernels: the same numbers
        assert torch.equal(mean, mean1) and torch.equal(var, var1)
        torch.testing.assert_close(y, y1, rtol=0, atol=0)
    torch.testing.assert_close(dx, xs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [(3, 5), (1, 7), (0, 8)], ids=["3+5", "1+7", "empty+8"])
def test_merged_halves_equal_the_whole_batch(backend, split):
    """What SyncBatchNorm does across processes: merge moments, sum the two backward sums."""
    x = torch.randn(8, 4, 3, dtype=torch.float64) * 5 + 100
    g = torch.randn_like(x)
    w = torch.randn(4, dtype=torch.float64)
    parts = [p for p in x.split(list(split)) if len(p)]
    gparts = [p for p in g.split(list(split)) if len(p)]
    merged = None
    for p in parts:
        mu, v = moments(p)
        mo = Moments.from_batch(mu, v, p.numel() // p.shape[1])
        merged = mo if merged is None else merge_moments(merged, mo)
    mean, var = merged.mean, merged.var
    sums = [backward_reduce(gp, p, mean) for p, gp in zip(parts, gparts, strict=True)]
    sum_g = sum(s[0] for s in sums)
    sum_gc = sum(s[1] for s in sums)
    count = int(merged.count)
    dx = torch.cat(
        [
            backward_elementwise(gp, p, mean, var, w, sum_g, sum_gc, count, 1e-5)
            for p, gp in zip(parts, gparts, strict=True)
        ]
    )
    y = torch.cat([normalize(p, mean, var, w, None, 1e-5) for p in parts])
    y_ref = reference.batch_norm_forward(x, w, None, 1e-5)[0]
    dx_ref = reference.batch_norm_backward(g, x, w, 1e-5)[0]
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])


def test_half_inputs(backend):
    x = (torch.randn(16, 3, 4) * 3 + 1).to(torch.bfloat16)
    mean, var = moments(x)
    ref_var, ref_mean = torch.var_mean(x.double(), (0, 2), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=1e-6)
    y = normalize(x, mean, var, None, None, 1e-5)
    assert y.dtype == torch.bfloat16
