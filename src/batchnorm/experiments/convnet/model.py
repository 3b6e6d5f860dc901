"""The network of the convnet study: a small Inception network in the spirit of the paper's variant."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...tools import add_batchnorm, name_layers
from ..runs import derive_seed
from .config import ConvnetConfig

__all__ = ["MODULES", "Inception", "LocalResponseNorm", "build_network"]


_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class LocalResponseNorm(nn.LocalResponseNorm):
    """torch's :class:`~torch.nn.LocalResponseNorm` (GoogLeNet's LRN), computed faster.

    The same function: ``x / (k + α/n · Σ_{c'} x_{c'}²)^β`` over the ``n`` channels ``c − n//2 …
    c + (n−1)//2`` (zero beyond the edges), as ``F.local_response_norm``, which sums the window
    with a 3-D average pooling that is slow on CPU, above all on channels-last tensors. Here the
    window is the sum of ``n`` shifted slices of the padded squares: about 2× faster forward and
    backward on this network's stem, where the LRN took 40% of a Baseline training step
    (benchmarks/README.md). Same constructor, state and ``repr`` as torch's.
    """

    def forward(self, x: Tensor) -> Tensor:
        n, channels = self.size, x.shape[1]
        sq = F.pad(x.square(), (0, 0, 0, 0, n // 2, (n - 1) // 2))
        window = sq[:, :channels]
        for i in range(1, n):
            window = window + sq[:, i : i + channels]
        return x / (self.k + self.alpha / n * window).pow(self.beta)


def _conv(cin: int, cout: int, k: int, act: str, stride: int = 1) -> nn.Sequential:
    """Conv (with bias) → nonlinearity; :func:`add_batchnorm` puts BN in between."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), _ACTIVATIONS[act]())


class Inception(nn.Module):
    """An Inception module of the paper's variant (Sec. 4.2; Szegedy et al. 2014, GoogLeNet).

    Four branches on the same input, concatenated along channels:

    - 1×1 convolution (``c1`` channels; omitted when 0),
    - 1×1 reduction to ``c3r`` channels, then a 3×3 convolution to ``c3``,
    - 1×1 reduction to ``d3r``, then *two* 3×3 convolutions to ``d3`` each (the paper's variant
      replaces GoogLeNet's 5×5 by two 3×3: the same receptive field, fewer weights),
    - 3×3 pooling (``pool``: "avg" or "max"), then a 1×1 projection to ``proj`` channels; with
      ``proj`` = 0 the pooled input passes through unchanged.

    With ``stride`` 2 the module halves the resolution (the paper's modules 3c and 4e): the 3×3
    convolutions that end a branch and the pooling (then always max) have stride 2, and there is no
    1×1 branch.
    """

    def __init__(
        self,
        cin: int,
        c1: int,
        c3r: int,
        c3: int,
        d3r: int,
        d3: int,
        proj: int,
        *,
        pool: str = "avg",
        stride: int = 1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        if stride not in (1, 2) or pool not in ("avg", "max") or (stride == 2 and c1):
            raise ValueError(f"Inception: unsupported pool={pool!r}, stride={stride}, c1={c1}")
        self.stride, self.pool = stride, "max" if stride == 2 else pool
        self.b1 = _conv(cin, c1, 1, act) if c1 else None
        self.b3 = nn.Sequential(_conv(cin, c3r, 1, act), _conv(c3r, c3, 3, act, stride))
        self.b33 = nn.Sequential(
            _conv(cin, d3r, 1, act), _conv(d3r, d3, 3, act), _conv(d3, d3, 3, act, stride)
        )
        self.proj = _conv(cin, proj, 1, act) if proj else None
        self.out_channels = c1 + c3 + d3 + (proj or cin)

    def forward(self, x: Tensor) -> Tensor:
        pool = F.max_pool2d if self.pool == "max" else F.avg_pool2d
        p = pool(x, 3, self.stride, 1)
        branches = [self.b3(x), self.b33(x), self.proj(p) if self.proj is not None else p]
        if self.b1 is not None:
            branches.insert(0, self.b1(x))
        return torch.cat(branches, 1)


# The modules' channels before the width multiplier: (name, c1, c3r, c3, d3r, d3, proj, pool,
# stride), GoogLeNet's table scaled down to a 7×7 (then 4×4) grid.
MODULES = (
    ("3a", 16, 16, 24, 16, 24, 16, "avg", 1),
    ("3b", 24, 24, 32, 16, 24, 16, "max", 1),
    ("3c", 0, 32, 48, 16, 24, 0, "max", 2),
    ("4a", 48, 32, 48, 16, 32, 32, "avg", 1),
)


def _inception_net(
    in_channels: int, classes: int, width: float, act: str, lrn: bool, dropout: float
) -> nn.Sequential:
    def c(n: int) -> int:
        return max(1, round(n * width))

    layers: list[nn.Module] = [
        _conv(in_channels, c(16), 3, act),  # stem, at full resolution
        nn.MaxPool2d(3, 2, 1),
    ]
    if lrn:
        layers.append(LocalResponseNorm(5))
    layers += [_conv(c(16), c(16), 1, act), _conv(c(16), c(48), 3, act)]
    if lrn:
        layers.append(LocalResponseNorm(5))
    layers.append(nn.MaxPool2d(3, 2, 1))
    cin = c(48)
    for _, c1, c3r, c3, d3r, d3, proj, pool, stride in MODULES:
        m = Inception(
            cin,
            c(c1) if c1 else 0,
            c(c3r),
            c(c3),
            c(d3r),
            c(d3),
            c(proj) if proj else 0,
            pool=pool,
            stride=stride,
            act=act,
        )
        layers.append(m)
        cin = m.out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(cin, classes))
    return nn.Sequential(*layers)


def build_network(cfg: ConvnetConfig, *, in_channels: int = 1, classes: int = 10) -> nn.Module:
    """The network of ``cfg.network``, initialized from ``cfg.seed``, channels-last.

    Every network of a seed starts from the same convolution weights: He-normal
    (``std = sqrt(2 / fan_in)``) drawn in module order by one generator, conv biases 0, the
    classifier ~ N(0, 0.01²) with bias 0. Dropout, LRN and the nonlinearity have no weights, and
    :func:`batchnorm.tools.add_batchnorm` (BN networks) inserts our BatchNorm2d between each
    convolution and its nonlinearity and drops the conv biases (zero anyway).
    """
    net, recipe = cfg.net, cfg.recipe
    model = _inception_net(
        in_channels, classes, cfg.width, net.activation, recipe.lrn, recipe.dropout
    )
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)
                m.bias.zero_()
    if net.bn:
        model = add_batchnorm(model, eps=cfg.eps, momentum=cfg.bn_momentum)
    return name_layers(model).to(memory_format=torch.channels_last)
