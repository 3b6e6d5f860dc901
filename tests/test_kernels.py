"""The fused kernels: exact statistics on hard inputs, thread-count independence, and the fallback
when they cannot be built."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchnorm.functional import batch_norm_train, kernels, reference, steps, use_backend
from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(not kernels.available(), reason="fused kernels unavailable")


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((4096, 64), None),
        ((8, 16, 40, 40), None),
        ((8, 16, 40, 40), torch.channels_last),
        ((2, 1, 70000), None),
        ((64, 3, 33, 33), None),
        ((4096, 40), None),  # 40 = 2 x 16 + 8 (AVX-512) or 5 x 8 (AVX2): a tail vector or not
        ((8, 24, 40, 40), torch.channels_last),  # 16 + 8 or 3 x 8
    ],
    ids=["2d", "nchw", "nhwc", "one-channel", "few-channels", "2d-tail", "nhwc-tail"],
)
def test_results_do_not_depend_on_thread_count(threads, shape, fmt):
    x = torch.randn(shape) * 3 + 100
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    g = torch.randn(shape)
    w = torch.randn(shape[1])
    out = {}
    for n in (1, 2):
        threads(n)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with use_backend("fused"):
            y, mean, var = batch_norm_train(xs, ws)
        y.backward(g)
        out[n] = (y, mean, var, xs.grad, ws.grad)
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a, b)


def test_fallback_when_the_kernels_cannot_build(tmp_path):
    """A failing build gives one warning and the portable path, which still computes BN."""
    code = (
        "import warnings, torch\n"
        "from batchnorm.functional import batch_norm_train, select_backend\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(6, 3)\n"
        "    y = batch_norm_train(x).output\n"
        "    batch_norm_train(x)\n"
        "print(select_backend(x), len(w), w[0].category.__name__ if w else '')\n"
        "print(float(y.mean(0).abs().max()) < 1e-6)\n"
    )
    env = {
        **os.environ,
        "BATCHNORM_CACHE": str(tmp_path),
        "BATCHNORM_CPU_ARCH": "no-such-cpu",
        "BATCHNORM_KERNELS": "",  # set but empty: the default, auto
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out == ["python", "1", "KernelsUnavailableWarning", "True"]
    env["BATCHNORM_KERNELS"] = "require"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "BATCHNORM_KERNELS=require" in proc.stderr


def test_a_build_killed_earlier_does_not_block_the_next(tmp_path):
    """A build killed mid-way leaves cpp_extension's lock file behind; the next build must not
    wait on it forever. (The arch is invalid, so the build itself fails fast, to the fallback.)"""
    code = (
        "import warnings\n"
        "from batchnorm._cache import cache_root\n"
        "from batchnorm.functional import kernels\n"
        "d = cache_root() / 'kernels' / kernels._key()\n"
        "d.mkdir(parents=True)\n"
        "(d / 'lock').touch()  # what a killed build leaves\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(kernels.load(), [x.category.__name__ for x in w])\n"
    )
    env = {
        **os.environ,
        "BATCHNORM_CACHE": str(tmp_path),
        "BATCHNORM_CPU_ARCH": "no-such-cpu",
        "BATCHNORM_KERNELS": "auto",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "['KernelsUnavailableWarning']"]


def test_large_input_gradients_avoid_4k_aliasing_with_the_input():
    """dx is placed half a page (mod 4 KB) away from x, so the backward's stores do not alias its
    loads (see empty_output in csrc/batchnorm_cpu.cpp); the values are unaffected."""
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    with use_backend("fused"):
        y = batch_norm_train(x).output
    (dx,) = torch.autograd.grad(y, x, g)
    distance = (dx.data_ptr() - x.data_ptr()) % 4096
    assert 2048 - 64 <= distance <= 2048 and dx.data_ptr() % 64 == x.data_ptr() % 64
    assert dx.is_contiguous() and dx.shape == x.shape
    with use_backend("python"):
        y_ref = batch_norm_train(x).output
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


# One input per path through the kernels' drivers, each large enough to run in parallel (over
# 32,768 values) and with several chunks (64K values) to merge, below the streaming threshold.
PATHS = {
    "planar-per-channel": ((100, 3, 30, 30), None),  # C >= threads: a task per channel, 2 chunks
    "planar-chunks": ((50, 1, 60, 60), None),  # C < threads: chunks of one channel in parallel
    "planar-strided": ((64, 5, 33, 31), "transposed"),  # a non-contiguous view, odd map sizes
    "rows-2d": ((3000, 40), None),  # 2 chunks of rows
    "rows-odd-channels": ((2500, 37), None),  # whole vectors, then one overlapping the last
    "rows-narrow": ((5000, 7), None),  # fewer channels than vector lanes: the scalar loop
    "rows-nhwc": ((16, 24, 20, 20), torch.channels_last),
    "rows-ndhwc": ((4, 8, 10, 20, 20), torch.channels_last_3d),
}


@pytest.mark.parametrize(
    "path,dtype",
    [pytest.param(p, torch.float32, id=p) for p in PATHS]
    + [
        pytest.param("planar-chunks", torch.bfloat16, id="planar-chunks-bfloat16"),
        pytest.param("rows-nhwc", torch.float16, id="rows-nhwc-float16"),
    ],
)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_every_driver_path_matches_float64_at_both_thread_counts(threads, path, dtype, n_threads):
    """y, the batch statistics, the running-statistics update and all three gradients against the
    float64 reference, at 1 and 2 threads, on each path through the drivers (per-channel tasks,
    parallel chunks of one channel, rows with several chunks and a scalar tail, 3-d rows,
    strided input) — sizes the generated tests do not reach."""
    threads(n_threads)
    shape, fmt = PATHS[path]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if fmt == "transposed":
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not x.is_contiguous()
    elif fmt is not None:
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    c = shape[1]
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    rm0, rv0 = rm.double(), rv.double()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend("fused"):
        y, mean, var = batch_norm_train(xr, wr, br, running_mean=rm, running_var=rv, momentum=0.3)
    dx, dw, db = torch.autograd.grad(y, (xr, wr, br), g)

    xd, gd, wd, bd = (t.double() for t in (x, g, w, b))
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(xd, wd, bd, 1e-5)
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(gd, xd, wd, 1e-5)
    m = x.numel() // c
    rtol = 1e-5 if dtype == torch.float32 else TOL[dtype]["rtol"]
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref)):
        # dense layouts are kept; a strided view comes back contiguous, as from torch
        strides = x.contiguous().stride() if fmt == "transposed" else x.stride()
        assert got.dtype == dtype and got.stride() == strides, name
        torch.testing.assert_close(
            got.double(), want, rtol=rtol, atol=rtol * want.abs().max(), msg=name
        )
    torch.testing.assert_close(mean, mean_ref, rtol=1e-7, atol=1e-7 * var_ref.sqrt().max())
    torch.testing.assert_close(var, var_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max())
    torch.testing.assert_close(db.double(), db_ref, rtol=1e-5, atol=1e-5 * db_ref.abs().max())
    # Alg. 2 with torch's moving average: the unbiased batch variance, m / (m - 1)
    torch.testing.assert_close(rm.double(), 0.7 * rm0 + 0.3 * mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        rv.double(), 0.7 * rv0 + 0.3 * var_ref * m / (m - 1), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "case",
    [
        "offset",
        "first-image-far",
        "first-of-many-far",
        "ramp",
        "constant",
        "one-image-chunks",
        "7x7",
    ],
)
@pytest.mark.parametrize(
    "fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
def test_statistics_are_exact_on_hard_inputs(threads, case, fmt):
    """Per-channel statistics, in float64 from float32 values, are exact to ~1e-7 on inputs where
    a one-pass or badly shifted reduction is not: a large offset, one image far from the others
    (in a chunk of 32 and of 1,337 feature maps), a ramp across each map, a constant channel,
    chunks of one image, small 7×7 maps; planar and rows (channels_last) layouts."""
    gen = torch.Generator().manual_seed(0)
    shape = {
        "one-image-chunks": (3, 2, 300, 300),  # 90,000 values per map: a chunk is one image
        "7x7": (8, 512, 7, 7),
        "first-of-many-far": (2000, 2, 7, 7),  # 1,337 maps per chunk
    }.get(case, (32, 4, 56, 56))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "offset":  # 1e4 + N(0, 1)
        x += 1e4
    elif case == "first-image-far":  # its mean ~6 std from the channel's
        x[0] += 1e3
    elif case == "first-of-many-far":  # ~37 std: one pass around it loses ~1e-4 of the variance
        x[0] += 1e4
    elif case == "ramp":  # a gradient across each map
        x += torch.linspace(-3, 3, shape[2], dtype=torch.float64)[:, None] + 1e3
    elif case == "constant":
        x = torch.full(shape, 0.1, dtype=torch.float64)
    x = x.float().contiguous(memory_format=fmt)
    ref = x.double()
    dims = [0, 2, 3]
    mean_ref, var_ref = ref.mean(dims), ref.var(dims, unbiased=False)
    for n in (1, 2):
        threads(n)
        with use_backend("fused"):
            _, mean, var = batch_norm_train(x)
        assert ((mean - mean_ref).abs() <= 1e-7 * var_ref.sqrt() + 1e-7 * mean_ref.abs()).all()
        if case == "constant":
            assert torch.all(var == 0)
        else:
            torch.testing.assert_close(var, var_ref, rtol=2e-7, atol=0)


# Outputs of 8 MiB or more are written with streaming stores (csrc: `stream_output`); odd planar
# sizes leave each feature map's start unaligned, so the scalar head and tail run too.
LARGE = {
    "nchw-odd": ((3, 8, 301, 307), None),
    "nhwc": ((4, 32, 130, 130), torch.channels_last),
    "2d": ((2100, 1024), None),
    "one-channel": ((2, 1, 1100, 1000), None),  # chunks of one channel normalized in parallel
}


def _all_outputs(x, g, w, b):
    """y and the gradients of the one-call path, and y, dx of the SyncBatchNorm steps."""
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend("fused"):
        y, mean, var = batch_norm_train(xr, wr, br)
        grads = torch.autograd.grad(y, (xr, wr, br), g)
        y2 = steps.normalize(x, mean, var, w, b, 1e-5)
        sum_g, sum_gc = steps.backward_reduce(g, x, mean)
        count = x.numel() // x.shape[1]
        dx2 = steps.backward_elementwise(g, x, mean, var, w, sum_g, sum_gc, count, 1e-5)
    return [y.detach(), *grads, y2, dx2]


@pytest.mark.parametrize(
    "case,dtype",
    [pytest.param(case, torch.float32, id=case) for case in LARGE]
    + [
        pytest.param("nchw-odd", torch.bfloat16, id="nchw-odd-bfloat16"),
        pytest.param("nhwc", torch.float16, id="nhwc-float16"),
        pytest.param("2d", torch.bfloat16, id="2d-bfloat16"),
    ],
)
def test_large_outputs_match_float64_and_the_unstreamed_path(case, dtype, threads):
    """y and dx of large inputs (one call and the SyncBatchNorm steps) agree with the float64
    reference, and bit for bit with streaming stores turned off (16-bit outputs: 16-bit inputs
    twice the shape's element count, so that they are as large)."""
    threads(2)
    shape, fmt = LARGE[case]
    if dtype != torch.float32:
        shape = (shape[0] * 2, *shape[1:])
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if fmt is not None:
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    old = kernels.set_stream_bytes(0)
    try:
        streamed = _all_outputs(x, g, w, b)
        kernels.set_stream_bytes(None)
        unstreamed = _all_outputs(x, g, w, b)
    finally:
        kernels.set_stream_bytes(old)
    for a, c in zip(streamed, unstreamed, strict=True):
        assert torch.equal(a, c)
    y, dx, dw, db, y2, dx2 = streamed
    xd, gd, wd, bd = (t.double() for t in (x, g, w, b))
    y_ref, _, _ = reference.batch_norm_forward(xd, wd, bd, 1e-5)
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(gd, xd, wd, 1e-5)
    # float32: the kernels' own error; 16-bit: that of storing the result in the dtype
    rtol = 1e-5 if dtype == torch.float32 else TOL[dtype]["rtol"]
    for got, want in ((y, y_ref), (y2, y_ref), (dx, dx_ref), (dx2, dx_ref)):
        assert got.dtype == dtype and got.stride() == x.stride()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max())
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(db.double(), db_ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    ("setter", "variable", "default"),
    [
        ("set_stream_bytes", "BATCHNORM_STREAM_BYTES", 8 << 20),
        ("set_stream_max_bytes", "BATCHNORM_STREAM_MAX_BYTES", 32 << 20),
    ],
)
def test_stream_settings_come_from_the_environment_and_reject_nonsense(setter, variable, default):
    code = (
        "from batchnorm.functional import kernels\n"
        f"print(kernels.{setter}(None), kernels.{setter}(8))\n"
    )
    for env_value, want in (("123", "123 None"), ("-1", "None None"), ("", f"{default} None")):
        env = {**os.environ, variable: env_value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.split("\n")[-2] == want
    set_ = getattr(kernels, setter)
    old = set_(None)
    try:
        with pytest.raises(RuntimeError, match="byte count or -1"):
            set_(-5)
    finally:
        set_(old)


def test_outputs_above_the_stream_limit_are_the_same_bit_for_bit():
    """A 33.6 MB output, streamed (no limit) and not (the default limit of 32 MiB)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 128, 128, generator=gen) * 2 + 5
    g = torch.randn(x.shape, generator=gen)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    assert x.numel() * 4 >= 32 << 20
    old = kernels.set_stream_max_bytes(None)
    try:
        streamed = _all_outputs(x, g, w, b)
        kernels.set_stream_max_bytes(32 << 20)
        plain = _all_outputs(x, g, w, b)
    finally:
        kernels.set_stream_max_bytes(old)
    for a, c in zip(streamed, plain, strict=True):
        assert torch.equal(a, c)


def test_the_kernels_refuse_bad_settings_before_writing_anything():
    x = torch.randn(4, 3)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    calls = [
        ("momentum must be in", dict(momentum=float("nan"))),
        ("momentum must be in", dict(momentum=2.0)),
        ("eps must be positive", dict(eps=0.0)),
        ("running statistics must be", dict(rv=torch.ones(4))),
        ("running statistics must be", dict(rv=torch.ones(3, dtype=torch.long))),
    ]
    for message, kw in calls:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.batchnorm.train_forward(
                x,
                None,
                None,
                rm,
                kw.get("rv", rv),
                nbt,
                None,
                kw.get("momentum", 0.1),
                kw.get("eps", 1e-5),
                True,
            )
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and nbt == 0


def _has_f16c() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() == "x86_64" and " f16c" in flags


@pytest.mark.skipif(
    not _has_f16c() or "BATCHNORM_CPU_ARCH" in os.environ,
    reason="the F16C conversions are used on x86-64 builds for the native CPU with F16C",
)
def test_16_bit_values_convert_by_instruction_not_by_libgcc_call():
    """float16 values convert with F16C instructions, never through libgcc's soft-float helpers:
    one half-to-double call per value in the float16 shift sample once made float16 statistics
    4x slower than bfloat16's, a speed bug that no result comparison can see."""
    binary = Path(kernels.module().__file__).read_bytes()
    for helper in (b"__extendhfsf2", b"__extendhfdf2", b"__truncsfhf2", b"__truncdfhf2"):
        assert helper not in binary, helper


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v2"])
def test_the_rows_blocking_benchmark_compiles_without_avx512(arch):
    """Issue 18 item 6: benchmarks/rows_blocking.cpp failed to compile on an AVX2-only machine.
    (Compiled only; timings belong in benchmarks/, never in tests.)"""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    source = Path(__file__).resolve().parents[1] / "benchmarks" / "rows_blocking.cpp"
    subprocess.run(
        ["g++", "-O1", f"-march={arch}", "-c", str(source), "-o", os.devnull], check=True
    )
