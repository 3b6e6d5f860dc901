"""The layer a user calls: ``batchnorm.BatchNorm*d`` against ``torch.nn.BatchNorm*d``, eager and
compiled, forward + backward in training mode, on the BN input shapes of real networks (issue 19).

Each timed call is what one BN layer does in a training step::

    for p in layer.parameters(): p.grad = None   # zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(g)

for four variants of the layer, interleaved in one process: torch's module eager, torch's module
under ``torch.compile`` (Inductor, CPU), ours eager, ours under ``torch.compile``. Ratios are time
over time, taken from medians over the rounds; the variants take turns within each round, and the
round's first variant rotates so that none always runs right after the same other one.

What differs from ``bm_kernels.py`` (same approach: interleaved, one process, median of rounds):

- glibc's malloc keeps its **default** settings (no ``mallopt``), as in a training process: large
  outputs (y, dx) are mapped afresh on every call and pay their page faults, for every variant
  alike. ``bm_kernels.py`` removes that cost to see the kernels; this script keeps it.
- Modules, not functions: each variant pays its module's Python code, autograd's
  ``AccumulateGrad`` of γ, β and x (x is a leaf; its gradient has x's layout for every variant, so
  it is stored, not copied) and, when compiled, Dynamo's guards.
- The number of calls per sample is calibrated once per shape (after the compile and a warm-up
  call), not per sample: the largest inputs here take 0.1–0.5 s per call, and re-calibrating in
  every sample (as ``bm_kernels._time`` does) would double the runtime.
- ``torch.compile`` gets a fresh module per shape and thread count (``dynamic=False``, after
  ``torch._dynamo.reset()``): static shapes, as a compiled network sees them, and code generated
  for the thread count it runs at (Inductor's CPU code specializes on it). Our module is compiled
  with ``fullgraph=True`` first; if that raises, the table says so and the column times the
  compile without ``fullgraph`` (with its graph breaks counted), or says that compiling failed.
  Torch's module gets the same treatment.

Shapes: every distinct BN input of ResNet-18 and ResNet-50 (torchvision's layout, v1.5 strides) at
batch 8 and 32 and MobileNetV2 at batch 32, all at 224×224, NCHW and channels_last, derived from
the architectures below (no torchvision needed); a 3-D U-Net's two levels; a 1-D audio input
(N, C, L); 2-D (N·L, C) inputs of an MLP/transformer.

    python benchmarks/bm_layers.py                    # 1 and 2 threads, all shapes
    python benchmarks/bm_layers.py --quick --threads 1
    python benchmarks/bm_layers.py --markdown out.md  # also write the table

The default run (91 shapes, 7 rounds, 1 and 2 threads) took 7.4 minutes on the project's 2 cores,
3 of them compiling, with Inductor's on-disk cache warm for one of the two thread counts; about 10
minutes with an empty cache.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import batchnorm
from batchnorm.functional import kernels

VARIANTS = ("torch eager", "torch comp", "ours eager", "ours comp")
COMPILE_SECONDS = {"torch comp": 0.0, "ours comp": 0.0}  # summed over the run, for its summary
GROUPS = ("NCHW", "channels_last", "2-D/1-D", "3-D")


@dataclass
class Shape:
    group: str
    shape: tuple[int, ...]
    nets: list[str] = field(default_factory=list)

    @property
    def channels_last(self) -> bool:
        return self.group == "channels_last"

    def label(self) -> str:
        return "×".join(map(str, self.shape))


# --- BN input shapes of the networks (C, H, W per image; computed from the architectures) ----------


def resnet_bn_inputs(bottleneck: bool, blocks: tuple[int, ...], size: int = 224) -> list[tuple]:
    """(C, H, W) of every BN input of a torchvision ResNet, in order (stride on the 3×3 conv)."""
    h = size // 2  # conv1: 7×7, stride 2
    out = [(64, h, h)]
    h //= 2  # max-pool, stride 2
    inplanes, expansion = 64, 4 if bottleneck else 1
    for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks, strict=True):
        for i in range(n):
            s = stride if i == 0 else 1
            ho = h // s
            if bottleneck:  # 1×1 (at the input's size), 3×3 with the stride, 1×1 to 4·planes
                out += [(planes, h, h), (planes, ho, ho), (planes * expansion, ho, ho)]
            else:  # 3×3 with the stride, 3×3
                out += [(planes, ho, ho), (planes, ho, ho)]
            if s != 1 or inplanes != planes * expansion:  # downsample: 1×1 conv + BN
                out.append((planes * expansion, ho, ho))
            inplanes, h = planes * expansion, ho
    return out


def mobilenet_v2_bn_inputs(size: int = 224) -> list[tuple]:
    """(C, H, W) of every BN input of torchvision's MobileNetV2 (width 1.0)."""
    h = size // 2
    out, cin = [(32, h, h)], 32  # stem: 3×3, stride 2
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)):
        for i in range(n):
            hidden, stride = cin * t, s if i == 0 else 1
            if t != 1:
                out.append((hidden, h, h))  # 1×1 expansion
            h //= stride
            out += [(hidden, h, h), (c, h, h)]  # 3×3 depthwise (with the stride), 1×1 projection
            cin = c
    for t, c, n, s in ((6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            hidden, stride = cin * t, s if i == 0 else 1
            out.append((hidden, h, h))
            h //= stride
            out += [(hidden, h, h), (c, h, h)]
            cin = c
    out.append((1280, h, h))  # the last 1×1 conv
    return out


def all_shapes() -> list[Shape]:
    nets: list[tuple[str, int, list[tuple]]] = []
    for batch in (8, 32):
        nets.append(("R18", batch, resnet_bn_inputs(False, (2, 2, 2, 2))))
        nets.append(("R50", batch, resnet_bn_inputs(True, (3, 4, 6, 3))))
    nets.append(("MNv2", 32, mobilenet_v2_bn_inputs()))
    found: dict[tuple[str, tuple[int, ...]], Shape] = {}

    def add(group: str, shape: tuple[int, ...], net: str) -> None:
        s = found.setdefault((group, shape), Shape(group, shape))
        if net not in s.nets:
            s.nets.append(net)

    for group in ("NCHW", "channels_last"):
        for name, batch, chw in nets:
            for c, h, w in chw:
                add(group, (batch, c, h, w), f"{name} b{batch}")
    add("2-D/1-D", (16, 128, 1000), "audio (N, C, L)")
    add("2-D/1-D", (4096, 768), "MLP/transformer (N·L, C)")
    add("2-D/1-D", (8192, 1024), "MLP/transformer (N·L, C)")
    add("3-D", (2, 32, 32, 64, 64), "3-D U-Net level 1")
    add("3-D", (2, 64, 16, 32, 32), "3-D U-Net level 2")
    # largest first within each group: the table reads from the shapes that dominate a step
    return sorted(found.values(), key=lambda s: (GROUPS.index(s.group), -math.prod(s.shape)))


def quick_shapes() -> list[Shape]:
    wanted = {
        ("NCHW", (8, 64, 56, 56)),
        ("NCHW", (32, 576, 7, 7)),
        ("channels_last", (8, 64, 56, 56)),
        ("2-D/1-D", (4096, 768)),
        ("3-D", (2, 64, 16, 32, 32)),
    }
    return [s for s in all_shapes() if (s.group, s.shape) in wanted]


# --- the machine ------------------------------------------------------------------------------


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    caches = []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("L2 cache", "L3 cache"):
                caches.append(f"{key.strip().split()[0]} {value.strip()}")
    except (OSError, subprocess.SubprocessError):
        caches.append("caches unknown (no lscpu)")
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f"))
    return f"{model}; {os.cpu_count()} logical CPUs; {isa}; {'; '.join(caches)}"


FIRST_USE = """
import sys, torch, batchnorm
layer = torch.compile(batchnorm.BatchNorm2d(8), fullgraph=True)
try:
    layer(torch.randn(4, 8, 5, 5, requires_grad=True)).sum().backward()
except Exception as exc:
    sys.exit(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
"""


def first_use_check() -> str:
    """Does ``torch.compile(ours, fullgraph=True)`` work in a fresh process, before any eager call
    has loaded the kernels? (In this process they are loaded before anything is compiled.)"""
    try:
        run = subprocess.run(
            [sys.executable, "-c", FIRST_USE], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    if run.returncode == 0:
        return "works"
    last = [line for line in run.stderr.splitlines() if line.strip()]
    return "fails (" + (last[-1] if last else f"exit {run.returncode}") + ")"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


# --- the variants -----------------------------------------------------------------------------


def _minor_faults() -> int:
    """Page faults of this process so far that needed no I/O (first touches of fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled(layer: nn.Module, step: Callable[[nn.Module], None]) -> tuple[object, str]:
    """``torch.compile(layer)``, fullgraph if it can; (the compiled module or None, a note)."""
    breaks = _graph_breaks()
    try:
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        step(compiled)  # compiles the forward and (on its first backward) the backward
        return compiled, ""
    except Exception as exc:
        note = f"fullgraph failed ({type(exc).__name__})"
    try:
        compiled = torch.compile(layer, dynamic=False)
        step(compiled)
        return compiled, f"{note}; {_graph_breaks() - breaks} graph break(s)"
    except Exception as exc:
        return None, f"{note}; compile failed ({type(exc).__name__}: {str(exc)[:80]})"


# Normwise relative error ‖a − ref‖/‖ref‖ allowed in a float32 gradient. Rounding gives 1e-7 to
# 1e-5 here (torch's own dβ on 32×32×112×112 channels_last: 2e-5, summing 401,408 values per
# channel); an error in the math gives O(1).
GRAD_TOLERANCE = 1e-4


def _float64_gradients(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """dx, dγ, dβ of training-mode BN (γ = 1, β = 0, as the layers start) in float64."""
    xd = x.detach().double().requires_grad_()
    w = torch.ones(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    torch.nn.functional.batch_norm(xd, None, None, w, b, training=True).backward(g.double())
    return xd.grad, w.grad, b.grad


def bench_shape(
    spec: Shape, rounds: int, budget: float
) -> tuple[dict[str, float | None], dict[str, float | None], str]:
    """Median seconds per call of each variant (None where it could not run), its mean page
    faults per call, and notes."""
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    x = torch.randn(spec.shape).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(spec.shape).contiguous(memory_format=fmt)
    layer_name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[x.dim()]
    c = spec.shape[1]
    layers = {
        "torch eager": getattr(torch.nn, layer_name)(c),
        "torch comp": getattr(torch.nn, layer_name)(c),
        "ours eager": getattr(batchnorm, layer_name)(c),
        "ours comp": getattr(batchnorm, layer_name)(c),
    }
    params = {k: list(m.parameters()) for k, m in layers.items()}

    def clear(name: str) -> None:
        for p in params[name]:
            p.grad = None
        x.grad = None

    def make_step(name: str) -> Callable[[object], None]:
        def step(module) -> None:
            clear(name)
            module(x).backward(g)

        return step

    notes: list[str] = []
    fns: dict[str, Callable[[], None]] = {}
    torch._dynamo.reset()  # a fresh cache: no recompile limit reached, code for this thread count
    for name, layer in layers.items():
        step = make_step(name)
        if name.endswith("comp"):
            t0 = time.perf_counter()
            module, note = _compiled(layer, step)
            compile_s = time.perf_counter() - t0
            COMPILE_SECONDS[name] += compile_s
            if note:
                notes.append(f"{name}: {note}")
            if module is None:
                continue
            print(f"  compiled {name} in {compile_s:.1f} s", file=sys.stderr, flush=True)
        else:
            module = layer
        fns[name] = lambda step=step, module=module: step(module)
    graphs_after_compile = _unique_graphs()

    # one warm-up call each, which checks the gradients (x, γ, β) against float64
    oracle = _float64_gradients(x, g)
    for name, fn in fns.items():
        clear(name)
        fn()
        layer = layers[name]
        got = (x.grad, layer.weight.grad, layer.bias.grad)
        for what, a, ref in zip(("dx", "dγ", "dβ"), got, oracle, strict=True):
            err = ((a.double() - ref).norm() / ref.norm()).item()
            if not err <= GRAD_TOLERANCE:
                notes.append(f"{name}: {what} off float64 by {err:.1e} (normwise)")
    del oracle
    # calibrate once: calls per sample so that a sample fills the budget (at least one call)
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        calls[name] = max(1, min(2000, round(budget / one)))
        clear(name)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, float | None] = dict.fromkeys(VARIANTS)
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[name], calls[name]
            f0 = _minor_faults()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
            faults[name] = (faults[name] or 0.0) + (_minor_faults() - f0) / (n * rounds)
            clear(name)  # the last call's gradients are not left for the next variant
    if _unique_graphs() != graphs_after_compile:
        notes.append(f"recompiled while timed ({_unique_graphs() - graphs_after_compile} graphs)")
    times: dict[str, float | None] = dict.fromkeys(VARIANTS)
    times.update({k: statistics.median(v) for k, v in samples.items()})
    return times, faults, "; ".join(notes).replace("|", "/")


# --- the table --------------------------------------------------------------------------------


def _ms(t: float | None) -> str:
    return "failed" if t is None else f"{t * 1e3:.3f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _fmt(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


RATIOS = {
    # name: (numerator, denominator), time over time
    "eager: torch / ours": ("torch eager", "ours eager"),
    "torch comp / ours eager": ("torch comp", "ours eager"),
    "ours comp / ours eager": ("ours comp", "ours eager"),
    "torch comp / ours comp": ("torch comp", "ours comp"),
}


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 shapes instead of all")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.03, help="seconds per timing sample")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument(
        "--shapes",
        help="only these shapes, comma-separated (e.g. 32x64x112x112,8192x1024), in every "
        "layout they appear in",
    )
    ap.add_argument(
        "--stream-bytes",
        type=int,
        help="a diagnostic: our kernels' streaming-store threshold (kernels.set_stream_bytes; "
        "-1: never); default: the library's",
    )
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"cannot benchmark: {kernels.status()}")
    if args.stream_bytes is not None:
        kernels.set_stream_bytes(None if args.stream_bytes < 0 else args.stream_bytes)
    # the script never calls mallopt; glibc's tunables in the environment still apply
    tunables = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    malloc = "glibc defaults (no mallopt)" if not tunables else "glibc with " + " ".join(tunables)
    stream = kernels.set_stream_bytes(None)  # (no getter: read it by setting it, then restore)
    kernels.set_stream_bytes(stream)
    limit = kernels.set_stream_max_bytes(None)
    kernels.set_stream_max_bytes(limit)
    started = time.perf_counter()
    first_use = first_use_check()
    shapes = quick_shapes() if args.quick else all_shapes()
    if args.shapes:
        wanted = {w.strip().replace("x", "×") for w in args.shapes.split(",")}
        shapes = [s for s in shapes if s.label() in wanted]
    threads = [int(t) for t in args.threads.split(",")]
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_description()}",
        f"torch {torch.__version__}; {kernels.status()}; our streaming stores: "
        f"{'never' if stream is None else f'outputs of {stream} bytes or more'}"
        f"{'' if limit is None or stream is None else f' and less than {limit}'}; threads "
        f"{args.threads}; malloc: {malloc}; {len(shapes)} shapes, {args.rounds} rounds, budget "
        f"{args.budget} s per sample; load average at start {load_average()}",
        f"`torch.compile(batchnorm.BatchNorm2d(8), fullgraph=True)` in a fresh process, before "
        f"any eager call: {first_use}",
        "",
        "Times are ms per `layer(x).backward(g)` (training mode, .grad set to None before each "
        "call), medians over the rounds; ratios are time over time (above 1: the second is "
        "faster); page faults are the process's minor faults per call, mostly the first touch "
        "of the 4 KiB pages of freshly mapped outputs.",
        "",
        "| group | shape | nets | thr | torch eager ms | torch comp ms | ours eager ms "
        "| ours comp ms | " + " | ".join(RATIOS) + " | page faults per call, thousands (same "
        "order) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[tuple[str, int, str], list[tuple[float, str]]] = {}
    for thr in threads:
        torch.set_num_threads(thr)
        for spec in shapes:
            t, faults, notes = bench_shape(spec, args.rounds, args.budget)
            cells = []
            for name, (num, den) in RATIOS.items():
                r = _ratio(t[num], t[den])
                cells.append(_fmt(r))
                if r is not None:
                    ratios.setdefault((spec.group, thr, name), []).append((r, spec.label()))
            line = (
                f"| {spec.group} | {spec.label()} | {', '.join(spec.nets)} | {thr} | "
                + " | ".join(_ms(t[v]) for v in VARIANTS)
                + f" | {' | '.join(cells)} | "
                + " / ".join(
                    "–" if faults[v] is None else f"{faults[v] / 1e3:.1f}" for v in VARIANTS
                )
                + f" | {notes} |"
            )
            lines.append(line)
            print(line, flush=True)
    summary = [
        "",
        "Geometric means of the ratios (time over time), with the lowest shape:",
        "",
        "| group | thr | shapes | " + " | ".join(RATIOS) + " |",
        "|---|---|---|" + "---|" * len(RATIOS),
    ]
    for thr in threads:
        for group in GROUPS:
            cols, count = [], 0
            for name in RATIOS:
                v = ratios.get((group, thr, name), [])
                if not v:
                    cols.append("–")
                    continue
                count = max(count, len(v))
                low, low_shape = min(v)
                cols.append(f"{geomean([r for r, _ in v]):.2f} (min {low:.2f}, {low_shape})")
            if count:
                summary.append(f"| {group} | {thr} | {count} | " + " | ".join(cols) + " |")
    below = sorted(
        (r, name, group, thr, shape)
        for (group, thr, name), v in ratios.items()
        if name in ("eager: torch / ours", "torch comp / ours eager")
        for r, shape in v
        if r < 1.0
    )
    summary += [
        "",
        f"Cells where ours eager is slower than torch eager or torch compiled: {len(below)}"
        + "".join(f"\n- {g} {s}, {thr} thr: {n} {r:.2f}" for r, n, g, thr, s in below),
        "",
        f"Total {time.perf_counter() - started:.0f} s, of which compiling (torch.compile's first "
        f"call, forward and backward) {COMPILE_SECONDS['torch comp']:.0f} s for torch's module "
        f"and {COMPILE_SECONDS['ours comp']:.0f} s for ours; load average at end {load_average()}",
    ]
    lines += summary
    print("\n".join(summary), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
