"""Inference latency of a ResNet-18 with eval-mode BN, after `batchnorm.fold`, and with no BN at all.

Alg. 2 line 11 of arXiv:1502.03167: at inference BN is a fixed affine map that "can be folded into
the preceding layer", so a folded network should cost what the same network without BN costs.
This measures that claim on CPU: the three variants run side by side in one process, interleaved
in a fresh random order every round, and the ratios are taken within each round (so drifting load
on a shared machine cancels out); the reported ratio is the median over rounds.

    python benchmarks/bm_fold.py                       # batch 1 and 32, 224x224, all threads
    python benchmarks/bm_fold.py --threads 1 --clock cpu   # steadier on a busy machine

The model is torchvision's resnet18 layout (BasicBlock, [2, 2, 2, 2], 64..512 channels, 11.7M
parameters), written out here so the project does not depend on torchvision.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(norm: type[nn.Module], num_classes: int = 1000) -> nn.Sequential:
    """ResNet-18; ``norm`` is the layer after each conv (a BN class, or ``nn.Identity``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        norm(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Plausible trained-looking BN statistics and γ/β (speed does not depend on their values)."""
    gen = torch.Generator().manual_seed(seed)
    for _, bn in batchnorm.tools.bn_layers(model):
        c = bn.num_features
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


CLOCKS = {
    # wall-clock latency: what a user sees, and what other processes on the machine disturb
    "wall": time.perf_counter,
    # CPU time of the calling thread: with --threads 1 torch computes on this thread only, so this
    # is the work itself, without the time other processes hold the core (cache and memory
    # bandwidth are still shared)
    "cpu": time.thread_time,
}


def seconds_per_forward(model: nn.Module, x: torch.Tensor, iters: int, clock) -> float:
    """The fastest of ``iters`` single forwards: on a shared machine other processes only ever
    add time, so the minimum is the best estimate of what the model itself costs."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(iters):
            start = clock()
            model(x)
            best = min(best, clock() - start)
    return best


def bench(
    models: dict[str, nn.Module], batch: int, size: int, rounds: int, iters: int, clock
) -> dict:
    x = torch.randn(batch, 3, size, size)
    for model in models.values():  # warm-up: oneDNN picks and caches its kernels
        seconds_per_forward(model, x, 2, clock)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(seconds_per_forward(models[name], x, iters, clock))
    ratio = {  # per-round ratios against no-BN, measured within the same round
        name: [t / base for t, base in zip(times[name], times["no BN"], strict=True)]
        for name in models
    }
    return {"times": times, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=0, help="default: 30 (batch 1), 24 (>1)")
    parser.add_argument("--threads", type=int, default=0, help="default: torch's default")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="cpu needs --threads 1")
    parser.add_argument("--tolerance", type=float, default=0.02, help="folded vs no-BN budget")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # the no-BN network's activations must not slow it via denormals
    random.seed(0)
    torch.manual_seed(0)

    with_bn = randomize_statistics(resnet18(batchnorm.BatchNorm2d)).eval()
    probe = torch.randn(2, 3, args.size, args.size)
    result = batchnorm.fold(with_bn, probe)
    no_bn = resnet18(nn.Identity).eval()
    models = {"eval BN": with_bn, "folded": result.model, "no BN": no_bn}
    n_params = sum(p.numel() for p in with_bn.parameters())

    print(
        f"bm_fold: ResNet-18 ({n_params / 1e6:.1f}M parameters), {args.size}x{args.size} input, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"fold: {len(result.folded)} BN folded, {len(result.affine)} affine; probe max |diff| = "
        f"{result.max_abs_diff:.2e} ({result.max_rel_diff:.2e} of max |output|)"
    )
    verdicts = []
    for batch in args.batch_sizes:
        rounds = args.rounds or (30 if batch == 1 else 24)
        iters = 5 if batch == 1 else 2
        r = bench(models, batch, args.size, rounds, iters, CLOCKS[args.clock])
        print(
            f"\nbatch {batch}: {rounds} rounds, variants in random order each round, "
            f"each timed as the fastest of {iters} forwards"
        )
        print(
            f"  {'variant':<8} {'min ms':>8} {'median ms':>10} {'ratio vs no BN':>15} "
            f"{'IQR of ratios':>16} {'ratio of mins':>14}"
        )
        for name in models:
            t = r["times"][name]
            q = statistics.quantiles(r["ratio"][name], n=4)
            print(
                f"  {name:<8} {min(t) * 1e3:>8.2f} {statistics.median(t) * 1e3:>10.2f} "
                f"{statistics.median(r['ratio'][name]):>15.3f} "
                f"{f'[{q[0]:.3f}, {q[2]:.3f}]':>16} {min(t) / min(r['times']['no BN']):>14.3f}"
            )
        folded = statistics.median(r["ratio"]["folded"])
        ok = folded <= 1 + args.tolerance
        verdicts.append(ok)
        print(
            f"  folded / no BN = {folded:.3f} (median of per-round ratios): "
            f"{'within' if ok else 'NOT within'} {args.tolerance:.0%}"
        )
    print("\nPASS" if all(verdicts) else "\nFAIL")


if __name__ == "__main__":
    main()
