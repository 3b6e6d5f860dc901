"""Streaming stores on and off: BN alone, and BN followed by ops that read its output.

The fused kernels write outputs of at least 8 MiB (y in the forward, dx in the backward)
with streaming (non-temporal) stores, which skip the read-for-ownership of each line but leave the
output out of cache. Whether that pays depends on the next op: it must then read y from memory.
This script measures both settings side by side in one process (``kernels.set_stream_bytes``),
interleaved, median over rounds, for

- ``bn``: the training forward alone, and forward + backward (``autograd.grad`` w.r.t. x, γ, β);
- ``chain``: ``relu(bn(x)) + x`` (a residual block's tail: ReLU and the add read y), forward
  under ``no_grad`` and forward + backward.

    python benchmarks/bm_stream.py                   # 1 and 2 threads, 3-33 MB inputs (~3 min)
    python benchmarks/bm_stream.py --threads 1 --shapes 32x64x56x56,32x64x28x28

"on / off" below 1 means streaming is faster.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from batchnorm.functional import batch_norm_train, kernels, use_backend
from bm_kernels import _time, keep_heap_pages

SHAPES = [
    "32x64x28x28",
    "32x256x14x14",
    "32x128x28x28",
    "64x64x28x28",
    "32x64x56x56",
    "128x64x32x32",
]


def bench(shape: tuple[int, ...], rounds: int, budget: float) -> dict[str, float]:
    c = shape[1]
    x = torch.randn(shape)
    g = torch.randn_like(x)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    xr = x.clone().requires_grad_()

    def bn(t):
        return batch_norm_train(t, w, b, running_mean=rm, running_var=rv, momentum=0.1).output

    def bn_fwd():
        with torch.no_grad():
            bn(x)

    def bn_fb():
        torch.autograd.grad(bn(xr), (xr, w, b), g)

    def chain_fwd():
        with torch.no_grad():
            torch.relu(bn(x)).add_(x)

    def chain_fb():
        torch.autograd.grad(torch.relu(bn(xr)) + xr, (xr, w, b), g)

    fns = {"bn fwd": bn_fwd, "bn fwd+bwd": bn_fb, "chain fwd": chain_fwd, "chain fwd+bwd": chain_fb}
    samples: dict[tuple[str, str], list[float]] = {}
    old = kernels.set_stream_bytes(None)
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                for setting, nbytes in (("off", None), ("on", 0)):
                    kernels.set_stream_bytes(nbytes)
                    samples.setdefault((name, setting), []).append(_time(fn, budget))
    finally:
        kernels.set_stream_bytes(old)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.05, help="seconds per timing sample")
    args = ap.parse_args()
    keep_heap_pages()
    if not kernels.available():
        raise SystemExit(f"cannot benchmark: {kernels.status()}")
    names = ["bn fwd", "bn fwd+bwd", "chain fwd", "chain fwd+bwd"]
    print("| thr | shape | MB | " + " | ".join(f"{n} off / on ms (on/off)" for n in names) + " |")
    print("|---" * (3 + len(names)) + "|", flush=True)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for text in args.shapes.split(","):
            shape = tuple(int(d) for d in text.split("x"))
            with use_backend("fused"):
                r = bench(shape, args.rounds, args.budget)
            mb = torch.Size(shape).numel() * 4 / 1e6
            cells = [
                f"{r[(n, 'off')] * 1e3:.2f} / {r[(n, 'on')] * 1e3:.2f} "
                f"({r[(n, 'on')] / r[(n, 'off')]:.2f})"
                for n in names
            ]
            print(
                f"| {threads} | {'×'.join(map(str, shape))} | {mb:.1f} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
