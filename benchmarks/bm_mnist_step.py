"""Cost of one SGD step of the Figure 1 MLP (784-100-100-100-10, batch 60): per-call overhead.

    python benchmarks/bm_mnist_step.py [--rounds 30] [--steps 100] [--threads 1,2]

Networks built by the experiment itself: without BN (biases kept), with our BatchNorm1d, with
torch.nn.BatchNorm1d (biases dropped before BN, Sec. 3.2), and a control in which each BN layer is
only its affine map γ·x + β (one torch op, the same two parameter tensors, no statistics): what
any layer with BN's parameters costs in this step, whatever its kernels. Same process, same
data, same batch order; the networks take turns in many short rounds and the median per-step time
is reported, so the machine's drift hits them all alike. Issue #3's target: the BN step at most
1.15× the step without BN. Also times what the experiment adds around the model (indexing a batch
out of the pre-binarized training tensor) and one test evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm import BatchNorm1d
from batchnorm.experiments.mnist import MnistConfig, build_mlp
from batchnorm.experiments.runs import DataOrder
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


class AffineOnly(nn.Module):
    """BN's scale and shift without the normalization: the control described above."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.weight)


def affine_only(model: nn.Sequential) -> nn.Sequential:
    for i, m in enumerate(model):
        if isinstance(m, BatchNorm1d):
            model[i] = AffineOnly(m.num_features)
    return model


def stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    order = DataOrder(len(x), 60, seed=0)
    step = [0]

    def run(n: int) -> None:
        for _ in range(n):
            step[0] += 1
            idx = order.indices(step[0])
            loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=100, help="steps per round and network")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    x, y = synthetic()
    cfg = MnistConfig()
    print(f"torch {torch.__version__}; {kernels.status()}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        runs = {
            "without BN": stepper(build_mlp(replace(cfg, network="plain")), x, y),
            "our BatchNorm1d": stepper(build_mlp(cfg), x, y),
            "torch BatchNorm1d": stepper(with_torch_bn(build_mlp(cfg)), x, y),
            "affine only": stepper(affine_only(build_mlp(cfg)), x, y),
        }
        for run in runs.values():
            run(50)  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(args.steps)
                samples[name].append((time.perf_counter() - start) / args.steps * 1e6)
        med = {k: statistics.median(v) for k, v in samples.items()}
        order = DataOrder(len(x), 60, seed=0)
        start = time.perf_counter()
        for s in range(1, 1001):
            idx = order.indices(s)
            x.index_select(0, idx), y.index_select(0, idx)
        gather = (time.perf_counter() - start) / 1000 * 1e6
        model = build_mlp(cfg).eval()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(5):
                model(x[:10000]).argmax(1)
        evaluate = (time.perf_counter() - start) / 5 * 1e3
        print(f"\n{threads} thread(s), median of {args.rounds} rounds × {args.steps} steps:")
        for name, t in med.items():
            print(f"  {name:18s} {t:7.1f} µs/step  {t / med['without BN']:.3f}× without BN")
        print(
            f"  our/torch BN step {med['our BatchNorm1d'] / med['torch BatchNorm1d']:.3f}; "
            f"batch indexing {gather:.0f} µs; test forward (10,000 images) {evaluate:.1f} ms"
        )


if __name__ == "__main__":
    main()
