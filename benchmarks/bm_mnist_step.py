"""Cost of one SGD step of the Figure 1 MLP: without BN, with our BatchNorm1d, with torch's.

    python benchmarks/bm_mnist_step.py [--steps 2000] [--threads 1,2]

Same process, same data, same batches for every variant; each is timed in three rounds after a
warm-up and the best round is kept (the VM is shared and noisy). Prints µs per step and the ratio
of our layer to ``torch.nn.BatchNorm1d``. Also times the parts of a step the experiment adds around
the model (indexing a batch out of the pre-binarized training tensor) and one test evaluation.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm import BatchNorm1d
from batchnorm.experiments.mnist import DataOrder, MnistConfig, build_mlp
from batchnorm.functional import kernels


def synthetic(n: int = 60000) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary inputs with MNIST's density (about 19% ones) — the cost does not depend on the values."""
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(n, 784, generator=gen) < 0.19).float(), torch.randint(
        0, 10, (n,), generator=gen
    )


def with_torch_bn(model: nn.Sequential) -> nn.Sequential:
    for i, m in enumerate(model):
        if isinstance(m, BatchNorm1d):
            model[i] = nn.BatchNorm1d(m.num_features, eps=m.eps, momentum=m.momentum)
    return model


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    order = DataOrder(len(x), 60, seed=0)
    best = float("inf")
    for rnd in range(4):  # round 0 warms up
        start = time.perf_counter()
        for s in range(1, steps + 1):
            idx = order.indices(s)
            loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if rnd:
            best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    x, y = synthetic()
    cfg = MnistConfig()
    print(f"torch {torch.__version__}; {kernels.status()}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        plain = time_steps(build_mlp(cfg, bn=False), x, y, args.steps)
        ours = time_steps(build_mlp(cfg, bn=True), x, y, args.steps)
        native = time_steps(with_torch_bn(build_mlp(cfg, bn=True)), x, y, args.steps)
        order = DataOrder(len(x), 60, seed=0)
        start = time.perf_counter()
        for s in range(1, args.steps + 1):
            idx = order.indices(s)
            x.index_select(0, idx), y.index_select(0, idx)
        gather = (time.perf_counter() - start) / args.steps * 1e6
        start = time.perf_counter()
        for s in range(1, args.steps + 1):
            idx = order.indices(s)
            x[idx], y[idx]
        fancy = (time.perf_counter() - start) / args.steps * 1e6
        model = build_mlp(cfg, bn=True).eval()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(5):
                model(x[:10000]).argmax(1)
        evaluate = (time.perf_counter() - start) / 5 * 1e3
        print(
            f"threads {threads}: step without BN {plain:6.0f} µs | with our BatchNorm1d {ours:6.0f} µs"
            f" | with torch.nn.BatchNorm1d {native:6.0f} µs | ours/torch {ours / native:.2f}"
            f" | batch indexing {gather:.0f} µs (x[idx]: {fancy:.0f} µs) | test forward (10,000 images) {evaluate:.1f} ms"
        )


if __name__ == "__main__":
    main()
