"""Cost of one training step of the convnet study (small Inception, batch 32, 28×28): issue #7.

    python benchmarks/bm_convnet_step.py [--rounds 10] [--steps 20] [--threads 1,2]

The networks built by the experiment itself (``batchnorm.experiments.convnet.build_network``):
Baseline (no BN, with LRN and Dropout), BN-Baseline (our BatchNorm2d, LRN and Dropout kept), BN-x5
(our BatchNorm2d, no LRN, no Dropout) and BN-x5 with torch.nn.BatchNorm2d. A step is what a run
does: build the augmented batch (``make_batch``), forward, backward, SGD with momentum. Same
process, synthetic images (the cost does not depend on the values); the networks take turns in
short rounds and the median per-step time is reported, so the machine's drift hits all alike.
Also times one evaluation of the 10,000 test images in inference mode. Issue #7's target: one
step of batch 32 in tens of milliseconds on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import data
from batchnorm.experiments import convnet, runs
from batchnorm.functional import kernels


def synthetic(n: int = 60000) -> data.Dataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    split = data.Split(images, labels)
    test = data.Split(images[:10000], labels[:10000])
    return data.Dataset("fashion-mnist", tuple(map(str, range(10))), split, test, "synthetic")


def stepper(cfg: convnet.ConvnetConfig, d: convnet.ConvnetData, torch_bn: bool = False):
    model = convnet.build_network(cfg)
    if torch_bn:
        model = batchnorm.convert(model, to="torch")
    r = cfg.recipe
    opt = torch.optim.SGD(
        model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
    )
    order = runs.DataOrder(len(d.x_train), cfg.batch_size, cfg.seed, shuffle=r.shuffle)
    step = [0]

    def run(n: int) -> None:
        for _ in range(n):
            step[0] += 1
            idx = order.indices(step[0])
            gen = torch.Generator().manual_seed(step[0])
            x, y = convnet.make_batch(d, idx, r, gen), d.y_train.index_select(0, idx)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and network")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    d = convnet.prepare_data(synthetic())
    base = convnet.ConvnetConfig()
    print(f"torch {torch.__version__}; {kernels.status()}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        nets = {
            "Baseline (LRN, Dropout)": stepper(replace(base, network="baseline"), d),
            "BN-Baseline (ours)": stepper(replace(base, network="bn-baseline"), d),
            "BN-x5 (ours)": stepper(replace(base, network="bn-x5"), d),
            "BN-x5 (torch BN)": stepper(replace(base, network="bn-x5"), d, torch_bn=True),
        }
        for run, _ in nets.values():
            run(5)  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in nets}
        for _ in range(args.rounds):
            for name, (run, _) in nets.items():
                start = time.perf_counter()
                run(args.steps)
                samples[name].append((time.perf_counter() - start) / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in samples.items()}
        model = nets["BN-x5 (ours)"][1].eval()
        start = time.perf_counter()
        with torch.no_grad():
            for xb in d.x_test.split(1000):
                model(xb).argmax(1)
        evaluate = time.perf_counter() - start
        print(f"\n{threads} thread(s), median of {args.rounds} rounds × {args.steps} steps:")
        for name, t in med.items():
            print(
                f"  {name:26s} {t:6.1f} ms/step  {t / med['Baseline (LRN, Dropout)']:.2f}× Baseline"
            )
        print(
            f"  our/torch BN (BN-x5): {med['BN-x5 (ours)'] / med['BN-x5 (torch BN)']:.3f}; "
            f"test evaluation (10,000 images, BN-x5): {evaluate:.2f} s"
        )


if __name__ == "__main__":
    main()
