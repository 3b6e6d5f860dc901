"""Training-mode BN: our fused CPU kernels against PyTorch's native kernels and the copy bandwidth.

Everything is measured side by side in one process, interleaved (native, ours, copy, native, ...)
so that the machine's drift hits both alike; each cell is the median over rounds. Bytes counted
are the minimum a kernel must move: forward reads x and writes y; backward reads x and dy and
writes dx; a copy reads and writes once. "of copy" is our GB/s over the copy's GB/s.

The copy is ``out.copy_(x)``, whose ordinary stores read each output line before writing it;
the kernels write large outputs with streaming stores (no such read), so they can exceed
1.0 of it. "fwd of pass" compares the forward with its own last pass alone (``steps.normalize``:
read x, write y, the same stores): what computing the statistics adds on top of the one pass a
forward cannot avoid. ``python benchmarks/bm_stream.py`` measures the stores on and off.

"of 2-pass" compares with what an exact kernel must move when x does not stay in cache between
its passes (the rows layouts: a channel's statistics need every row before any output): the
forward reads x twice and writes y (one read of x, ``x.sum()``, plus one copy), the backward
reads x and dy twice and writes dx (two reads, plus one read and one copy), all timed in the same
run. Planar inputs can exceed 1.0 of it: a channel's maps stay in cache between its passes.

    python benchmarks/bm_kernels.py                  # full table, 1 and 2 threads
    python benchmarks/bm_kernels.py --quick          # a smaller sweep
    python benchmarks/bm_kernels.py --markdown out.md

Allocator: with two or more large tensors alive (y and dx), glibc's malloc returns freed memory to
the OS and maps it again on the next call, so every call pays a first-touch page fault per 4 KB
page (measured here: 12,500 faults, ~20 ms per iteration for two 25 MB tensors — for PyTorch's
kernels and ours alike). By default this script sets ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GB)``
so the heap keeps its pages and the table measures the kernels; ``--default-malloc`` measures
with glibc's defaults instead. Training loops see the same effect: MALLOC_MMAP_MAX_=0 and
MALLOC_TRIM_THRESHOLD_ in the environment (or jemalloc/tcmalloc) remove it.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.functional import batch_norm_train, kernels, steps, use_backend

SHAPES: list[tuple[str, tuple[int, ...], torch.memory_format | None]] = [
    ("2-D", (60, 100), None),
    ("2-D", (256, 1024), None),
    ("2-D", (4096, 1024), None),
    ("NCHW", (32, 64, 56, 56), None),
    ("NCHW", (128, 64, 32, 32), None),
    ("NCHW", (32, 256, 14, 14), None),
    ("NCHW", (8, 512, 7, 7), None),
    ("NHWC", (32, 64, 56, 56), torch.channels_last),
    ("NHWC", (128, 64, 32, 32), torch.channels_last),
    ("NHWC", (32, 256, 14, 14), torch.channels_last),
    ("NHWC", (8, 512, 7, 7), torch.channels_last),
    ("NCL", (64, 128, 256), None),
    ("NCDHW", (8, 32, 16, 28, 28), None),
    # one channel (a grayscale input's BatchNorm2d(1)): contiguous in both memory formats; kept
    # out of the groups
    ("C=1", (64, 1, 112, 112), None),
]
QUICK = [SHAPES[i] for i in (0, 2, 3, 6, 7, 11, 13)]


def _time(fn: Callable[[], object], budget_s: float) -> float:
    """Seconds per call: enough calls to fill ``budget_s``, at least 2."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(2, min(2000, int(budget_s / one)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(_time(fn, budget_s))
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_shape(shape, fmt, dtype, rounds, budget):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    xr = x.detach().requires_grad_()
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()

    def native_fwd():
        return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    def ours_fwd():
        return batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=0.1).output

    # autograd.grad, not .backward(): no gradient accumulation pass into x.grad on either side
    def native_fb():
        y = F.batch_norm(xr, rm, rv, w, b, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xr, w, b), g)

    def ours_fb():
        y = batch_norm_train(xr, w, b, running_mean=rm, running_var=rv, momentum=0.1).output
        torch.autograd.grad(y, (xr, w, b), g)

    # eval mode, layer against layer (both run PyTorch's kernel; ours adds its own checks)
    layer = f"BatchNorm{max(1, x.dim() - 2)}d"
    ours_layer = getattr(batchnorm, layer)(c).eval()
    torch_layer = getattr(torch.nn, layer)(c).eval()

    def copy():
        out.copy_(x)

    def read():  # one read of x (a sum: torch's vectorized reduction)
        return x.sum()

    mean, var = steps.moments(x)

    def elementwise():  # the forward's last pass alone: read x, write y (same store policy)
        return steps.normalize(x, mean, var, w, b, 1e-5)

    with torch.no_grad():
        fwd = measure(
            {
                "native": native_fwd,
                "ours": ours_fwd,
                "copy": copy,
                "read": read,
                "pass": elementwise,
            },
            rounds,
            budget,
        )
    fb = measure({"native": native_fb, "ours": ours_fb}, rounds, budget)
    with torch.no_grad():
        ev = measure(
            {"native": lambda: torch_layer(x), "ours": lambda: ours_layer(x)},
            max(1, rounds // 2),
            budget,
        )
    copy_bw = 2 * nbytes / fwd["copy"]
    row = {
        "fwd_native": fwd["native"],
        "fwd_ours": fwd["ours"],
        "fb_native": fb["native"],
        "fb_ours": fb["ours"],
        "eval_native": ev["native"],
        "eval_ours": ev["ours"],
        "copy_gbs": copy_bw / 1e9,
        # minimal bytes: fwd 2 passes (read x, write y); fwd+bwd 5 (x, y; x, dy, dx)
        "fwd_of_copy": (2 * nbytes / fwd["ours"]) / copy_bw,
        "fb_of_copy": (5 * nbytes / fb["ours"]) / copy_bw,
        "fwd_of_pass": fwd["pass"] / fwd["ours"],
        # the two-pass bound: each pass that must see all of x (or x and dy) before writing
        # reads it again; fwd = read x + copy, bwd = read x, dy + (read dy + copy), in the
        # same run's measured read and copy times
        "fwd_of_2pass": (fwd["read"] + fwd["copy"]) / fwd["ours"],
        "fb_of_2pass": (4 * fwd["read"] + 2 * fwd["copy"]) / fb["ours"],
    }
    return row


def keep_heap_pages() -> bool:
    """Stop glibc from unmapping freed large blocks (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.05, help="seconds per timing sample")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as is")
    args = ap.parse_args()
    malloc = "glibc defaults" if args.default_malloc or not keep_heap_pages() else "heap kept"
    if not kernels.available():
        raise SystemExit(f"cannot benchmark: {kernels.status()}")
    shapes = QUICK if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    lines = [
        f"torch {torch.__version__}; {kernels.status()}; malloc: {malloc}",
        "",
        "| layout | shape | dtype | thr | fwd native ms | fwd ours ms | fwd × | fwd+bwd native ms "
        "| fwd+bwd ours ms | fwd+bwd × | copy GB/s | fwd of copy | fwd+bwd of copy | fwd of pass "
        "| fwd of 2-pass | fwd+bwd of 2-pass | eval × |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[tuple[str, str, int], list[float]] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for layout, shape, fmt in shapes:
                with use_backend("fused"):
                    r = bench_shape(shape, fmt, dtype, rounds, args.budget)
                fx = r["fwd_native"] / r["fwd_ours"]
                fbx = r["fb_native"] / r["fb_ours"]
                ratios.setdefault(
                    (
                        layout if layout in ("NCHW", "NHWC", "C=1") else "2-D/other",
                        dtype_name,
                        threads,
                    ),
                    [],
                ).append(fbx)
                line = (
                    f"| {layout} | {'×'.join(map(str, shape))} | {dtype_name} | {threads} "
                    f"| {r['fwd_native'] * 1e3:.3f} | {r['fwd_ours'] * 1e3:.3f} | {fx:.2f} "
                    f"| {r['fb_native'] * 1e3:.3f} | {r['fb_ours'] * 1e3:.3f} | {fbx:.2f} "
                    f"| {r['copy_gbs']:.1f} | {r['fwd_of_copy']:.2f} | {r['fb_of_copy']:.2f} "
                    f"| {r['fwd_of_pass']:.2f} | {r['fwd_of_2pass']:.2f} | {r['fb_of_2pass']:.2f} "
                    f"| {r['eval_native'] / r['eval_ours']:.2f} |"
                )
                lines.append(line)
                print(line, flush=True)
    lines.append("")
    lines.append("Geometric mean of the fwd+bwd speed-up over native:")
    for (group, dtype_name, threads), v in sorted(ratios.items()):
        gm = math.exp(sum(math.log(r) for r in v) / len(v))
        lines.append(f"- {group}, {dtype_name}, {threads} thread(s): {gm:.2f}× (min {min(v):.2f}×)")
    print("\n".join(lines[-len(ratios) - 1 :]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
