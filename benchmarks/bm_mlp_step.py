"""Per-call overhead at small sizes: a full SGD step of the MNIST MLP (784-100-100-100-10, batch 60).

Three networks with identical weights where they share layers: no BN (Linear biases kept), torch's
``nn.BatchNorm1d`` on every hidden layer, ours on every hidden layer (biases dropped, Sec. 3.2).
Steps are interleaved network by network in many short rounds and the median per-step time is
reported, so machine drift affects all three alike. The issue's target: BN step ≤ 1.15× no-BN.

    python benchmarks/bm_mlp_step.py [--threads 1,2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import batchnorm
from batchnorm.functional import kernels


def mlp(bn: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 784
    for _ in range(3):
        layers.append(nn.Linear(d, 100, bias=bn is None))
        if bn is not None:
            layers.append(bn(100))
        layers.append(nn.Sigmoid())
        d = 100
    layers.append(nn.Linear(100, 10))
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=100, help="steps per round and network")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; {kernels.status()}")
    x = torch.rand(60, 784)
    y = torch.randint(0, 10, (60,))
    loss_fn = nn.CrossEntropyLoss()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        nets = {
            "no BN": mlp(None),
            "torch BN": mlp(nn.BatchNorm1d),
            "batchnorm BN": mlp(batchnorm.BatchNorm1d),
        }
        steps = {}
        for name, net in nets.items():
            opt = torch.optim.SGD(net.parameters(), lr=0.1)

            def step(net=net, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn(net(x), y).backward()
                opt.step()

            for _ in range(50):
                step()
            steps[name] = step
        samples: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                samples[name].append((time.perf_counter() - t0) / args.steps)
        med = {k: statistics.median(v) for k, v in samples.items()}
        base = med["no BN"]
        print(f"\n{threads} thread(s), median of {args.rounds} rounds × {args.steps} steps:")
        for name, t in med.items():
            print(f"  {name:13s} {t * 1e6:8.1f} µs/step   {t / base:.3f}× no-BN")


if __name__ == "__main__":
    main()
