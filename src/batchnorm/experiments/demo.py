"""A short tour: train a small BN network on synthetic data and look at its statistics.

The data are Gaussian blobs whose features have wildly different offsets and scales (so that
normalization matters), the network is Linear → BN → ReLU twice (biases dropped before BN,
Sec. 3.2), trained with plain SGD; then the moving averages are set beside the paper's population
statistics (Alg. 2).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import kernels
from ..nn import BatchNorm1d
from ..tools import bn_layers
from .config import Config, at_least, param, positive, positive_int


@dataclass(frozen=True)
class DemoConfig(Config):
    steps: int = param(400, "SGD steps", check=positive_int)
    batch_size: int = param(64, "examples per mini-batch", check=at_least(2, " (BN needs m > 1)"))
    lr: float = param(0.1, "SGD learning rate", check=positive)
    features: int = param(20, "input features", check=positive_int, cli=False)
    classes: int = param(4, "classes", check=at_least(2), cli=False)
    hidden: int = param(64, "hidden units", check=positive_int, cli=False)
    seed: int = param(0, "random seed", check=at_least(0))
    population_batches: int = param(
        50, "batches of the explicit population pass (Alg. 2 lines 8-10)", check=positive_int
    )
    # As `batchnorm reproduce`: at this size one thread is as fast and does not slow down, or get
    # slowed down by, whatever else the machine runs (benchmarks/README.md).
    threads: int = param(1, "intra-op threads", check=positive_int)


def _data(cfg: DemoConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(
        cfg.classes, cfg.features, generator=torch.Generator().manual_seed(cfg.seed)
    )
    offsets = torch.logspace(-1, 3, cfg.features)  # features centred anywhere from 0.1 to 1000
    scales = torch.logspace(-2, 2, cfg.features)
    y = torch.randint(0, cfg.classes, (n,), generator=gen)
    x = (centers[y] + 0.7 * torch.randn(n, cfg.features, generator=gen)) * scales + offsets
    return x, y


def run(cfg: DemoConfig | None = None, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Train, report on the way, and return the final loss, accuracies and training time."""
    cfg = cfg or DemoConfig()
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, echo)
    finally:
        torch.set_num_threads(old)


def _run(cfg: DemoConfig, echo: Callable[[str], None]) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = nn.Sequential(
        nn.Linear(cfg.features, cfg.hidden, bias=False),
        BatchNorm1d(cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden, bias=False),
        BatchNorm1d(cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.classes),
    )
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    echo(f"batchnorm demo: {kernels.status()}")
    echo(
        f"training {cfg.steps} SGD steps, batch {cfg.batch_size}, lr {cfg.lr} on synthetic data "
        f"(features offset 0.1..1000, scaled 0.01..100)"
    )
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = _data(cfg, cfg.batch_size, gen)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, cfg.steps // 8) == 0:
            echo(f"  step {step:4d}  loss {loss.item():.4f}")
    train_s = time.perf_counter() - start

    x_test, y_test = _data(cfg, 5000, torch.Generator().manual_seed(cfg.seed + 2))

    def accuracy(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return (m(x_test).argmax(1) == y_test).float().mean().item()

    acc_ema = accuracy(model)
    # Alg. 2: with the weights frozen, estimate population statistics over training batches.
    population = copy.deepcopy(model)
    for _, layer in bn_layers(population):
        layer.stats_mode = "population"
        layer.reset_running_stats()
    population.train()
    with torch.no_grad():
        for _ in range(cfg.population_batches):
            population(_data(cfg, cfg.batch_size, gen)[0])
    acc_pop = accuracy(population)
    model.train()
    acc_batch = (
        (model(x_test[: cfg.batch_size]).argmax(1) == y_test[: cfg.batch_size])
        .float()
        .mean()
        .item()
    )

    echo(f"trained in {train_s:.2f} s")
    echo(
        "per-layer statistics (mean over channels): EMA running stats vs the paper's population estimate"
    )
    for (name, ema), (_, pop) in zip(bn_layers(model), bn_layers(population), strict=True):
        echo(
            f"  layer {name}: running_mean {ema.running_mean.mean():+.4f} vs {pop.running_mean.mean():+.4f}"
            f"   running_var {ema.running_var.mean():.4f} vs {pop.running_var.mean():.4f}"
        )
    echo(f"test accuracy, eval mode with EMA statistics:        {acc_ema:.4f}")
    echo(f"test accuracy, eval mode with population statistics: {acc_pop:.4f}")
    echo(f"accuracy of one training-mode batch (batch statistics): {acc_batch:.4f}")
    return {"loss": loss.item(), "acc_ema": acc_ema, "acc_population": acc_pop, "train_s": train_s}
