"""The Figure 1 network: 784 → 100 → 100 → 100 → 10 sigmoid MLP, with or without BN."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...nn import BatchNorm1d
from ...tools import name_layers
from ..runs import derive_seed
from .config import MnistConfig

__all__ = ["build_mlp", "sigmoid_input"]


def build_mlp(
    cfg: MnistConfig,
    *,
    in_features: int = 784,
    classes: int = 10,
    norm: Callable[[int], nn.Module] | None = None,
) -> nn.Sequential:
    """The network of ``cfg.network``; with BN, BN before every hidden sigmoid, no hidden biases.

    The weights are drawn from N(0, init_std²) by a generator seeded from ``cfg.seed`` in the same
    order for both networks, so the two start from identical weight matrices. ``norm(width)``
    builds each hidden layer's BN (default: our :class:`~batchnorm.nn.BatchNorm1d` with the
    config's eps and momentum).
    """
    bn = cfg.bn
    norm = norm or (lambda h: BatchNorm1d(h, eps=cfg.eps, momentum=cfg.bn_momentum))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
    layers: list[nn.Module] = []
    width = in_features
    for h in cfg.hidden:
        layers.append(nn.Linear(width, h, bias=not bn))  # Sec. 3.2: the bias is redundant before BN
        if bn:
            layers.append(norm(h))
        layers.append(nn.Sigmoid())
        width = h
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, cfg.init_std, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
    return name_layers(model)


def sigmoid_input(model: nn.Sequential, x: Tensor) -> Tensor:
    """The input of the last hidden sigmoid (Figure 1(b, c)): ``Wu + b`` or ``BN(Wu)``."""
    last = max(i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid))
    return model[:last](x)
