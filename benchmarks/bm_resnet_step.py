"""One ResNet-18 training step on the CPU with our BN against torch's: the number a user feels.

    python benchmarks/bm_resnet_step.py                  # batch 16, 224x224, 1 and 2 threads
    python benchmarks/bm_resnet_step.py --quick          # batch 2, 64x64: a check that it runs

Issue 19's "whole network" target: a training step (forward, cross-entropy, backward, SGD with
momentum) of ResNet-18 (torchvision's layout, from ``bm_fold``) with ``batchnorm.BatchNorm2d``,
with ``torch.nn.BatchNorm2d``, and with no BN at all (``nn.Identity``). BN's share of a step is
(step − step without BN) ÷ step, for ours and for torch's. The three models take turns in a
fresh random order every round, and every ratio is taken within a round, so drifting load on a
shared machine hits all three alike; the table gives the median over rounds. Denormals are
flushed so that the network without BN cannot slow down on tiny activations. The models start
from the same weights; the first step of each (kernel loading, allocator warm-up) is not timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.functional import kernels
from bm_fold import resnet18
from bm_layers import cpu_description

VARIANTS = {"ours": batchnorm.BatchNorm2d, "torch": nn.BatchNorm2d, "no BN": nn.Identity}


def models(seed: int = 0) -> dict[str, nn.Module]:
    out = {}
    for name, norm in VARIANTS.items():
        torch.manual_seed(seed)  # the same convolution and classifier weights in every variant
        out[name] = resnet18(norm).train()
    return out


def stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    return step


def measure(batch: int, size: int, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    nets = models()
    with torch.no_grad():  # the same network: ours and torch's BN give the same first loss
        loss = {n: F.cross_entropy(nets[n](x), y).item() for n in ("ours", "torch")}
    steps = {name: stepper(m, x, y) for name, m in nets.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
    per_round = [{n: times[n][i] for n in steps} for i in range(rounds)]

    def median(f) -> float:
        return statistics.median(f(r) for r in per_round)

    return {
        "threads": threads,
        "batch": batch,
        "size": size,
        "rounds": rounds,
        "loss gap": abs(loss["ours"] - loss["torch"]) / abs(loss["torch"]),
        "step": {n: statistics.median(v) for n, v in times.items()},
        "torch / ours": median(lambda r: r["torch"] / r["ours"]),
        "share ours": median(lambda r: (r["ours"] - r["no BN"]) / r["ours"]),
        "share torch": median(lambda r: (r["torch"] - r["no BN"]) / r["torch"]),
        "bn ratio": median(lambda r: (r["torch"] - r["no BN"]) / max(r["ours"] - r["no BN"], 1e-9)),
    }


def table(results: list[dict]) -> str:
    rows = [
        "| threads | batch × size | step, ours | step, torch | step, no BN | **torch ÷ ours (step)** "
        "| BN's share, ours | BN's share, torch | torch's BN time ÷ ours | rounds "
        "| first loss, ours vs torch (relative) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["step"]
        rows.append(
            f"| {r['threads']} | {r['batch']} × {r['size']}² | {1e3 * s['ours']:.0f} ms | "
            f"{1e3 * s['torch']:.0f} ms | {1e3 * s['no BN']:.0f} ms | **{r['torch / ours']:.3f}** | "
            f"{r['share ours']:.1%} | {r['share torch']:.1%} | {r['bn ratio']:.2f}× | "
            f"{r['rounds']} | {r['loss gap']:.1e} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="batch 2, 64x64, 2 rounds")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.size, args.rounds = 2, 64, 2
    torch.set_flush_denormal(True)
    kernels.load()
    head = (
        f"CPU: {cpu_description()}\ntorch {torch.__version__}, batchnorm {batchnorm.__version__}, "
        f"kernels {'on' if kernels.available() else 'off'}"
    )
    print(head, flush=True)
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        results.append(measure(args.batch, args.size, threads, args.rounds))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = head + "\n\n" + table(results) + "\n"
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
