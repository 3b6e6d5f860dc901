"""Figures 2 and 3 of the paper (Sec. 4.2): accelerating BN networks, at CPU scale.

The paper trains an Inception network on ImageNet with and without BN, and shows that BN *plus a
few changes to the training recipe* (Sec. 4.2.1) reaches the baseline's best accuracy in 14× fewer
steps, trains at 30× the learning rate, and trains with sigmoids where the baseline stays at chance.
This module runs the same study with the same structure at a size a 2-core CPU can afford:

- **Data**: Fashion-MNIST by default (MNIST and CIFAR-10 as options), inputs scaled to [0, 1] and
  standardized per channel with the training set's mean and std.
- **Network** (:func:`build_network`): a small Inception network in the spirit of the paper's
  variant: a stem (3×3 conv, max pool, LRN, 1×1 and 3×3 convs, LRN, max pool), four Inception
  modules (:class:`Inception`: 1×1, 3×3 and double-3×3 branches — the 5×5 factorized into two
  3×3, Sec. 4.2 — and a pooling branch; one module reduces the resolution with stride 2 and a
  pass-through max pool, as the paper's modules 3c and 4e do), global average pooling, Dropout,
  and one fully connected layer, the classifier. BN networks get our
  :class:`~batchnorm.nn.BatchNorm2d` before every nonlinearity by
  :func:`batchnorm.tools.add_batchnorm` (Alg. 2 lines 1–2; the conv biases are dropped, Sec. 3.2),
  so a BN network and its baseline start from the *same* convolution weights.
- **Training**: SGD with momentum, mini-batches of 32, the learning rate decayed exponentially,
  L2 weight decay, Dropout before the classifier, LRN in the stem, random translations and
  photometric distortions (brightness, contrast) of the training images: the :class:`Recipe`.
- **Networks** (:data:`NETWORKS`), as in the paper: Baseline, BN-Baseline (BN, same recipe), BN-x5
  and BN-x30 (BN and :func:`accelerate`: the seven changes of Sec. 4.2.1 with the learning rate
  ×5 and ×30), BN-x5-Sigmoid; and the paper's two failures as controls: Baseline-x5 (the
  baseline's recipe at 5× its learning rate: "the same learning rate increase with original
  Inception caused the model parameters to reach machine infinity") and Baseline-Sigmoid. Not in
  the paper, run only when named: the ablation ``bn-x5-slow-decay``, BN-x5 with the Baseline's
  learning-rate decay.
- **Evaluation**: test accuracy on the test set (the paper's "validation" set: it used ImageNet's
  validation images) at :func:`evaluation_steps`. BN networks are evaluated in inference mode with
  their moving averages — "the moving averages can be used instead to track the accuracy of the
  model as it trains" (Sec. 3.1) — and, every ``population_every`` steps and at the end, also with
  the population statistics of Alg. 2 (:func:`batchnorm.tools.recalibrate`, the paper's
  estimator, over ``population_batches`` un-augmented training batches), to show how much the
  choice matters.
- **Divergence**: a training loss that is not finite or above ``divergence_loss`` (1,000 by
  default; chance is ln 10 ≈ 2.3, and a loss of 1,000 means logits of that size: the weights are
  on their way to "machine infinity"), a weight that is not finite after an update, or a BN layer
  whose batch statistics overflowed (it counts that in ``nonfinite_skips``) ends the run cleanly:
  the step and the reason are recorded, the run counts as complete, and a resumed run does not
  retry it.

Each network is one run folder (:mod:`batchnorm.experiments.runs`: config, env, metrics,
checkpoints, TensorBoard, lock); :func:`run_study` runs several, in parallel processes if asked.
The global batch of every step, its augmentation and its Dropout masks are pure functions of
``(seed, step)``, so a resumed run repeats an uninterrupted one exactly. Under ``torchrun``
(:class:`~.runs.Ranks`) each process trains its slice of the same augmented global batch; only
the Dropout masks differ from a single-process run (each rank draws its own from
``(seed, step, rank)``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data
from ..tools import add_batchnorm, name_layers
from . import runs
from .runs import RunError

__all__ = [
    "MAIN",
    "NETWORKS",
    "QUICK",
    "STUDY",
    "ConvnetConfig",
    "ConvnetData",
    "Inception",
    "LocalResponseNorm",
    "Network",
    "Recipe",
    "RunError",
    "accelerate",
    "build_network",
    "check_fits",
    "evaluation_steps",
    "make_batch",
    "population_steps",
    "prepare_data",
    "quick",
    "run",
    "run_name",
    "run_study",
]

_CHECKPOINT_VERSION = 1


# -- the training recipe, and what Sec. 4.2.1 changes in it ---------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How a network is trained: every setting Sec. 4.2.1 changes, and the optimizer it keeps.

    The defaults are the Baseline's recipe (its learning rate from the sweep in the report).
    """

    lr: float = 0.02  # initial learning rate of SGD with momentum
    lr_half_life: float = 2000.0  # steps in which the learning rate halves (exponential decay)
    momentum: float = 0.9  # SGD momentum (the paper: "SGD with momentum", value not given)
    weight_decay: float = 5e-4  # L2 weight decay, added to the gradient of every parameter
    dropout: float = 0.4  # Dropout before the classifier (GoogLeNet's 0.4)
    lrn: bool = True  # local response normalization in the stem (GoogLeNet's, size 5)
    shuffle: runs.Shuffle = "batches"  # "batches": fixed mini-batches; "examples": reshuffled
    photometric: float = 0.4  # photometric distortion strength p (see make_batch)
    translate: int = 2  # random translation by up to ± this many pixels (kept by Sec. 4.2.1)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"Recipe: {msg}")

        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise bad(f"lr must be a positive finite number, got {self.lr!r}")
        if not (isinstance(self.lr_half_life, (int, float)) and self.lr_half_life > 0):
            raise bad(f"lr_half_life must be a positive number of steps, got {self.lr_half_life!r}")
        if not 0 <= self.momentum < 1:
            raise bad(f"momentum must be in [0, 1), got {self.momentum}")
        if not (0 <= self.weight_decay < math.inf):
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise bad(f"dropout must be in [0, 1), got {self.dropout}")
        if self.shuffle not in ("examples", "batches"):
            raise bad(f"shuffle must be 'examples' or 'batches', got {self.shuffle!r}")
        if not 0 <= self.photometric <= 1:
            raise bad(f"photometric must be in [0, 1], got {self.photometric}")
        if not (isinstance(self.translate, int) and 0 <= self.translate <= 8):
            raise bad(f"translate must be an integer in 0..8, got {self.translate!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of training step ``step`` (1-based): ``lr · 2^(−(step−1)/half_life)``."""
        return self.lr * 0.5 ** ((step - 1) / self.lr_half_life)


# Sec. 4.2.1's fixed factors. "Reduce the photometric distortions" gives no amount: we halve them.
L2_DIVISOR = 5.0  # "reduce the L2 weight regularization ... by a factor of 5"
DECAY_SPEEDUP = 6.0  # "we accelerated the learning rate decay by a factor of 6"
PHOTOMETRIC_FACTOR = 0.5  # DEVIATION: the amount is ours; the paper says only "reduce"


def accelerate(
    recipe: Recipe, lr_factor: float = 5.0, decay_speedup: float = DECAY_SPEEDUP
) -> Recipe:
    """The changes of Sec. 4.2.1 ("Accelerating BN networks") applied to ``recipe``.

    "Simply adding Batch Normalization to a network does not take full advantage of our method.
    To do so, we further changed the network and its training parameters, as follows":

    1. *Increase learning rate*: ``lr × lr_factor`` (BN-x5: 5, BN-x30: 30).
    2. *Remove Dropout*: ``dropout = 0`` (BN regularizes, Sec. 3.4).
    3. *Reduce the L2 weight regularization* by 5: ``weight_decay / 5``.
    4. *Accelerate the learning rate decay* by 6: ``lr_half_life / decay_speedup`` (6; the
       ablation ``bn-x5-slow-decay`` keeps the Baseline's decay with 1).
    5. *Remove Local Response Normalization*: ``lrn = False``.
    6. *Shuffle training examples more thoroughly*: ``shuffle = "examples"`` (a fresh
       permutation every epoch instead of fixed mini-batches, :class:`~.runs.DataOrder`).
    7. *Reduce the photometric distortions*: ``photometric × 0.5`` (the amount is our choice;
       the geometric ones, translations here, are kept).

    Pure: returns a new :class:`Recipe` and leaves ``recipe`` alone.
    """
    for name, value in (("lr_factor", lr_factor), ("decay_speedup", decay_speedup)):
        if not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"accelerate: {name} must be a positive finite number, got {value!r}")
    return replace(
        recipe,
        lr=recipe.lr * lr_factor,
        dropout=0.0,
        weight_decay=recipe.weight_decay / L2_DIVISOR,
        lr_half_life=recipe.lr_half_life / decay_speedup,
        lrn=False,
        shuffle="examples",
        photometric=recipe.photometric * PHOTOMETRIC_FACTOR,
    )


@dataclass(frozen=True)
class Network:
    """One network of the study: its architecture switches and how its recipe derives from the base."""

    name: str  # CLI and folder name
    label: str  # the paper's name
    bn: bool  # BN before every nonlinearity
    activation: str  # "relu" or "sigmoid"
    accelerated: float | None  # accelerate(base, this) if set, else the base recipe ...
    lr_factor: float = 1.0  # ... with its learning rate multiplied by this
    decay_speedup: float = DECAY_SPEEDUP  # accelerate()'s learning-rate decay factor
    ablation: bool = False  # ours, not the paper's: run only when named, not in 'all'

    def recipe(self, base: Recipe) -> Recipe:
        r = (
            base
            if self.accelerated is None
            else accelerate(base, self.accelerated, self.decay_speedup)
        )
        return replace(r, lr=r.lr * self.lr_factor) if self.lr_factor != 1.0 else r


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("baseline", "Baseline", bn=False, activation="relu", accelerated=None),
        Network("bn-baseline", "BN-Baseline", bn=True, activation="relu", accelerated=None),
        Network("bn-x5", "BN-x5", bn=True, activation="relu", accelerated=5.0),
        Network("bn-x30", "BN-x30", bn=True, activation="relu", accelerated=30.0),
        Network("bn-x5-sigmoid", "BN-x5-Sigmoid", bn=True, activation="sigmoid", accelerated=5.0),
        Network(
            "baseline-x5", "Baseline-x5", bn=False, activation="relu", accelerated=None, lr_factor=5
        ),
        Network(
            "baseline-sigmoid", "Baseline-Sigmoid", bn=False, activation="sigmoid", accelerated=None
        ),
        # Not in the paper: BN-x5 with all of Sec. 4.2.1's changes but the faster decay, to test
        # whether the 6× faster decay is what stops BN-x5 short at a budget of thousands of steps.
        Network(
            "bn-x5-slow-decay",
            "BN-x5, Baseline's decay",
            bn=True,
            activation="relu",
            accelerated=5.0,
            decay_speedup=1.0,
            ablation=True,
        ),
    )
}
# The paper's seven networks ('all'); ablations run when named.
STUDY = tuple(n for n, net in NETWORKS.items() if not net.ablation)
# The comparisons of Figure 3 that get several seeds; the others are one-seed controls.
MAIN = ("baseline", "bn-baseline", "bn-x5", "bn-x30")


# -- the configuration of one run ----------------------------------------------------------------


@dataclass(frozen=True)
class ConvnetConfig:
    """Every setting of one run (one network, one seed); saved to ``config.json``, checked on resume."""

    network: str = "baseline"  # a key of NETWORKS
    seed: int = 0  # initial weights, data order, augmentation, Dropout, population batches
    dataset: str = "fashion-mnist"
    steps: int = 10_000  # SGD steps (the same budget for every network)
    batch_size: int = 32  # the paper's mini-batch size
    eval_every: int = 500  # steps between evaluations (a quarter of it in the first 4×)
    population_every: int = 2_000  # steps between Alg. 2 population evaluations (BN networks)
    population_batches: int = 50  # training batches of the population pass (1,600 images)
    test_examples: int | None = None  # evaluate on the first N test images (None: all)
    base: Recipe = field(
        default_factory=Recipe
    )  # the Baseline's recipe; each network derives its own
    width: float = 1.0  # channel multiplier of the network
    eps: float = 1e-5  # BN's ε
    bn_momentum: float = 0.1  # momentum of BN's moving averages (torch's convention and default)
    divergence_loss: float = 1000.0  # a training loss above this (or not finite) ends the run
    # Intra-op threads while training. One per process, with networks in parallel processes:
    # predictable on a shared machine, and part of the config because results may differ in the
    # last bit between thread counts (a resumed run must repeat the same arithmetic).
    threads: int = 1
    # Data-parallel runs (torchrun): the number of processes, and whether BN statistics are
    # synchronized over them (else each process normalizes its slice of the batch). Saved only
    # when processes > 1, so a single-process config.json is what it always was.
    processes: int = 1
    bn_sync: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"ConvnetConfig: {msg}")

        if self.network not in NETWORKS:
            raise bad(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.dataset not in data.DATASETS:
            raise bad(f"dataset must be one of {', '.join(data.DATASETS)}, got {self.dataset!r}")
        for name in (
            "steps",
            "batch_size",
            "eval_every",
            "population_every",
            "population_batches",
            "threads",
            "processes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise bad(f"batch_size must be at least 2 (BN needs m > 1), got {self.batch_size}")
        if self.processes > self.batch_size:
            raise bad(f"{self.processes} processes cannot share a batch of {self.batch_size}")
        if self.test_examples is not None and (
            not isinstance(self.test_examples, int) or self.test_examples < 1
        ):
            raise bad(
                f"test_examples must be a positive integer or None, got {self.test_examples!r}"
            )
        if not (isinstance(self.width, (int, float)) and 0.25 <= self.width <= 8):
            raise bad(f"width must be between 0.25 and 8, got {self.width!r}")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            raise bad(f"eps must be in (0, 1), got {self.eps!r}")
        if not 0 <= self.bn_momentum <= 1:
            raise bad(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        if not (isinstance(self.divergence_loss, (int, float)) and self.divergence_loss > 0):
            raise bad(f"divergence_loss must be a positive number, got {self.divergence_loss!r}")
        if not isinstance(self.base, Recipe):
            raise bad(f"base must be a Recipe, got {type(self.base).__name__}")

    @property
    def net(self) -> Network:
        return NETWORKS[self.network]

    @property
    def recipe(self) -> Recipe:
        """This network's recipe, derived from the base one."""
        return self.net.recipe(self.base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = asdict(self.recipe)  # derived; saved so the files say what was trained
        if self.processes == 1:
            del d["processes"], d["bn_sync"]
        return d


# What --quick changes: a CI-sized study (a minute or two per network on one core) that still
# shows real properties. The learning rate decays over the short run as the full one does.
QUICK = {
    "steps": 600,
    "eval_every": 100,
    "population_every": 300,
    "test_examples": 2000,
    "lr_half_life": 200.0,
}


def quick(cfg: ConvnetConfig) -> ConvnetConfig:
    """``cfg`` with the --quick preset (:data:`QUICK`) applied."""
    recipe_keys = {f.name for f in fields(Recipe)}
    top = {k: v for k, v in QUICK.items() if k not in recipe_keys}
    base = replace(cfg.base, **{k: v for k, v in QUICK.items() if k in recipe_keys})
    return replace(cfg, base=base, **top)


def run_name(cfg: ConvnetConfig) -> str:
    """The run folder's name: network, its own initial learning rate, seed."""
    return f"{cfg.network}_lr{cfg.recipe.lr:g}_seed{cfg.seed}"


def population_steps(cfg: ConvnetConfig) -> set[int]:
    """The evaluations that also use the population statistics of Alg. 2 (BN networks): the
    first and the last, and the first at or after every multiple of ``population_every``."""
    evals = evaluation_steps(cfg)
    due = range(cfg.population_every, cfg.steps + 1, cfg.population_every)
    return {0, cfg.steps} | {next(s for s in evals if s >= k) for k in due}


def evaluation_steps(cfg: ConvnetConfig) -> list[int]:
    """The steps after which a run is evaluated (and checkpointed).

    Step 0, then every ``eval_every/4`` steps up to ``4·eval_every`` — where the fast networks
    cross the baseline's accuracy, so their "steps to reach" is resolved to within about 25% —
    then every ``eval_every`` steps, and the last step.
    """
    early = max(1, cfg.eval_every // 4)
    points = set(range(early, 4 * cfg.eval_every + 1, early))
    points |= set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
    return [0, *sorted(p for p in points | {cfg.steps} if p <= cfg.steps)]


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvnetData:
    """A data set ready for training: uint8 training images (augmented per batch), standardized
    float32 test images (channels-last), and the per-channel mean and std used for both."""

    name: str
    x_train: Tensor  # uint8 (N, C, H, W)
    y_train: Tensor  # int64 (N,)
    x_test: Tensor  # float32 (N, C, H, W), standardized, channels-last
    y_test: Tensor
    mean: Tensor  # (1, C, 1, 1), of the training pixels scaled to [0, 1]
    std: Tensor
    classes: int
    source: str

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def prepare_data(dataset: data.Dataset) -> ConvnetData:
    """Per-channel mean and std of the training set; the test set standardized once."""
    x = dataset.train.images
    scaled = x.double().div(255)
    mean = scaled.mean(dim=(0, 2, 3), keepdim=True).float()
    std = scaled.std(dim=(0, 2, 3), keepdim=True).float()
    x_test = (dataset.test.images.float().div(255) - mean) / std
    return ConvnetData(
        dataset.name,
        x.contiguous(),
        dataset.train.labels.contiguous(),
        x_test.contiguous(memory_format=torch.channels_last),
        dataset.test.labels.contiguous(),
        mean,
        std,
        len(dataset.classes),
        str(dataset.source),
    )


def make_batch(d: ConvnetData, idx: Tensor, recipe: Recipe, gen: torch.Generator | None) -> Tensor:
    """The training images ``idx``, distorted as ``recipe`` says, standardized, channels-last.

    Distortions, with the random draws from ``gen`` (``None``: no distortion at all):

    - geometric: each image moved by a random (dy, dx) in ``[−translate, translate]²`` pixels,
      filled with black (zero) where it moves away from the border;
    - photometric, strength p = ``recipe.photometric``, on the [0, 1] pixel scale: contrast
      ``c ~ U(1 − p, 1 + p)`` about the image's own mean, then brightness ``b ~ U(−p/2, p/2)``
      added, then clipped to [0, 1].
    """
    x = d.x_train.index_select(0, idx).float().div_(255)
    if gen is not None and recipe.translate:
        t = recipe.translate
        padded = F.pad(x, (t, t, t, t))
        offsets = torch.randint(0, 2 * t + 1, (len(x), 2), generator=gen).tolist()
        h, w = x.shape[-2:]
        x = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
        )
    if gen is not None and recipe.photometric:
        p = recipe.photometric
        c = 1 + p * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
        b = p / 2 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * c + m + b).clamp_(0, 1)
    return ((x - d.mean) / d.std).contiguous(memory_format=torch.channels_last)


# -- the network ----------------------------------------------------------------------------------

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
    gen = torch.Generator().manual_seed(runs.derive_seed(cfg.seed, "init"))
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


# -- one run --------------------------------------------------------------------------------------


def _accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for xb, yb in zip(x.split(1000), y.split(1000), strict=True):
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


def _population_batches(cfg: ConvnetConfig, d: ConvnetData, step: int) -> list[Tensor]:
    """``population_batches`` random un-augmented training batches, drawn from ``(seed, step)``."""
    gen = torch.Generator().manual_seed(runs.derive_seed(cfg.seed, "population", step))
    idx = torch.randperm(len(d.x_train), generator=gen)[: cfg.population_batches * cfg.batch_size]
    return [make_batch(d, i, cfg.recipe, None) for i in idx.split(cfg.batch_size)]


def _evaluate(cfg: ConvnetConfig, d: ConvnetData, model: nn.Module, step: int) -> dict:
    start = time.perf_counter()
    n = cfg.test_examples or len(d.y_test)
    x, y = d.x_test[:n], d.y_test[:n]
    rec: dict = {}
    model.eval()
    try:
        rec["test_acc"], rec["test_loss"] = _accuracy_and_loss(model, x, y)
    finally:
        model.train()
    if cfg.net.bn and step in population_steps(cfg):
        pop = runs.population_copy(model, _population_batches(cfg, d, step))
        rec["test_acc_population"], rec["test_loss_population"] = _accuracy_and_loss(pop, x, y)
    rec["eval_s"] = time.perf_counter() - start
    return rec


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _overflowed(skips: list[Tensor]) -> bool:
    """Whether a BN layer skipped a batch whose statistics were not finite (its own counter)."""
    return bool(skips) and int(torch.stack(skips).sum()) > 0


def check_fits(cfg: ConvnetConfig, train_images: int, test_images: int) -> None:
    """Raise :class:`~.runs.ConfigError` if a size in ``cfg`` exceeds the data set's."""
    runs.check_batch_sizes(cfg.batch_size, cfg.population_batches, train_images)
    if cfg.test_examples is not None and cfg.test_examples > test_images:
        raise runs.ConfigError(
            f"test_examples = {cfg.test_examples} exceeds the {test_images} test images"
        )


def run(
    cfg: ConvnetConfig,
    run_dir: str | os.PathLike,
    d: ConvnetData,
    *,
    progress: bool | Callable[[int], None] = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train one network (or resume it) and evaluate it at :func:`evaluation_steps`.

    Writes ``config.json``, ``env.json``, ``metrics.jsonl``/``.csv``, ``checkpoint.pt`` and
    TensorBoard events under ``tb/`` (see :mod:`~.runs`). ``progress``: a tqdm bar (True), none
    (False), or a function called with the current step every 50 steps and once at the start.
    """
    run_dir = Path(run_dir)
    runs.Ranks().check(cfg.processes)
    if d.name != cfg.dataset:
        raise ValueError(f"the data are {d.name!r}, but the config asks for {cfg.dataset!r}")
    check_fits(cfg, len(d.x_train), len(d.y_test))
    with runs.open_run(run_dir, cfg.to_dict(), threads=cfg.threads):
        return _run(cfg, run_dir, d, progress, echo)


def _run(
    cfg: ConvnetConfig,
    run_dir: Path,
    d: ConvnetData,
    progress: bool | Callable[[int], None],
    echo: Callable[[str], None],
) -> Path:
    recipe = cfg.recipe
    ranks = runs.Ranks()
    model = build_network(cfg, in_channels=d.in_channels, classes=d.classes)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    ckpt_path = run_dir / runs.CHECKPOINT
    records: list[dict] = []
    start_step, train_s, diverged = 0, 0.0, None
    state = runs.load_checkpoint(ckpt_path, _CHECKPOINT_VERSION)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        records, start_step = state["metrics"], state["step"]
        train_s, diverged = state["train_s"], state["diverged"]
        if ranks.writer:  # metrics written after the checkpoint may be newer
            runs.write_metrics(run_dir, records)
    ranks.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    if start_step >= cfg.steps or diverged:
        how = f"diverged at step {diverged['step']}" if diverged else f"{cfg.steps} steps"
        if ranks.writer:
            echo(f"{run_dir}: already complete ({how})")
        return run_dir
    trained = ranks.wrap(model, sync_bn=cfg.bn_sync)  # the model itself, or DDP around it
    tb = None
    if ranks.writer:
        runs.start_session(run_dir, seed=cfg.seed, resumed_from=start_step, source=d.source)
        if start_step:
            echo(f"{run_dir}: resuming at step {start_step} of {cfg.steps}")
        tb = runs.tensorboard(run_dir, start_step)
    else:
        progress = False
    order = runs.DataOrder(len(d.x_train), cfg.batch_size, cfg.seed, shuffle=recipe.shuffle)
    bar = runs.progress_bar(cfg.steps, start_step, run_name(cfg)) if progress is True else None
    report = progress if callable(progress) else None
    if report is not None:
        report(start_step)
    evals = set(evaluation_steps(cfg))
    loss_sum = correct = seen = 0.0
    skips = [b for name, b in model.named_buffers() if name.endswith("nonfinite_skips")]

    def checkpoint(step: int, rec: dict) -> None:
        if not ranks.writer:
            return
        records.append(rec)
        runs.log_scalars(tb, rec, step)
        runs.save_checkpoint(
            ckpt_path,
            {
                "version": _CHECKPOINT_VERSION,
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "train_s": train_s,
                "diverged": diverged,
                "metrics": records,
            },
        )
        runs.write_metrics(run_dir, records)

    def record(step: int) -> dict:
        nonlocal loss_sum, correct, seen
        rec = {
            "step": step,
            "epoch": step * cfg.batch_size / len(d.x_train),
            "lr": recipe.lr_at(max(step, 1)),
            "train_loss": loss_sum / seen if seen else None,
            "train_acc": correct / seen if seen else None,
            "clock_s": time.time(),  # when this record was made (seconds since the epoch)
        }
        loss_sum = correct = seen = 0.0
        return rec

    try:
        if start_step == 0 and ranks.writer:
            parameters = sum(p.numel() for p in model.parameters())
            checkpoint(
                0,
                {
                    **record(0),
                    "parameters": parameters,
                    **_evaluate(cfg, d, model, 0),
                    "train_s": 0.0,
                },
            )
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = recipe.lr_at(step)
            idx = order.indices(step)
            gen = torch.Generator().manual_seed(runs.derive_seed(cfg.seed, "augment", step))
            # the global batch, augmented as in one process; then this rank's slice of it
            x, y = make_batch(d, idx, recipe, gen), d.y_train.index_select(0, idx)
            x, y = ranks.local(x), ranks.local(y)
            # Dropout: one process draws the masks of its batch; a rank draws its own, else every
            # slice would get the same masks (so data-parallel Dropout differs from one process)
            key = ("dropout", step) if ranks.world == 1 else ("dropout", step, ranks.rank)
            torch.manual_seed(runs.derive_seed(cfg.seed, *key))
            logits = trained(x)
            loss = ranks.loss(logits, y, len(idx))
            value, overflowed = loss.item(), _overflowed(skips)
            if ranks.world > 1:  # the mean loss of the global batch; every rank stops together
                total, flags = ranks.sum([value, float(overflowed)])
                value, overflowed = total / ranks.world, flags > 0
            if not math.isfinite(value) or value > cfg.divergence_loss:
                diverged = {"step": step, "reason": f"training loss {value:.4g}"}
                break
            if overflowed:
                diverged = {"step": step, "reason": "a BN layer's batch statistics overflowed"}
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not _params_finite(model):
                diverged = {"step": step, "reason": "a weight is not finite after the update"}
                break
            loss_sum += value * len(idx)
            correct += float((logits.detach().argmax(1) == y).sum())
            seen += len(idx)
            train_s += time.perf_counter() - t0
            if step in evals:
                if ranks.world > 1:
                    (correct,) = ranks.sum([correct])  # this rank's count, summed over ranks
                failure = None
                if ranks.writer:
                    try:
                        rec = {**record(step), **_evaluate(cfg, d, model, step), "train_s": train_s}
                        checkpoint(step, rec)
                    except Exception as exc:
                        failure = exc
                    else:
                        if bar is not None:
                            bar.set_postfix(test_acc=f"{rec['test_acc']:.4f}", refresh=False)
                else:
                    record(step)  # resets the counters
                ranks.agree(failure)  # the others wait while rank 0 evaluates, and share its fate
            if step % 50 == 0:
                if bar is not None:
                    bar.update(step - bar.n)
                if report is not None:
                    report(step)
        if diverged is not None:
            # "reached machine infinity": the run ends here, cleanly, and counts as complete
            if ranks.world > 1:
                (correct,) = ranks.sum([correct])
            checkpoint(
                diverged["step"],
                {**record(diverged["step"]), "diverged": diverged["reason"], "train_s": train_s},
            )
            if ranks.writer:
                echo(f"{run_dir}: diverged at step {diverged['step']} ({diverged['reason']})")
        elif bar is not None:
            bar.update(cfg.steps - bar.n)
        if report is not None:
            report(cfg.steps)
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
    return run_dir


# -- a study: several runs, sequentially or in parallel processes ----------------------------------


def run_study(
    configs: Sequence[ConvnetConfig],
    out: str | os.PathLike,
    dataset: data.Dataset,
    *,
    jobs: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Run every config into ``out/<run_name>``: in this process one after the other
    (``jobs`` = 1), or in ``jobs`` worker processes (each loads the data from
    ``dataset.source`` itself). Returns the run folders.

    Raises :class:`~.runs.RunError` naming every run that failed (the others complete);
    ``KeyboardInterrupt`` stops every run at its last checkpoint.
    """
    out = Path(out)
    dirs = [out / run_name(c) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two configs share a run folder; vary network, base lr or seed")
    if jobs <= 1:
        prepared = prepare_data(dataset)
        for cfg, run_dir in zip(configs, dirs, strict=True):
            run(cfg, run_dir, prepared, progress=progress, echo=echo)
        return dirs
    tasks = [
        (cfg, str(run_dir), dataset.name, str(dataset.source))
        for cfg, run_dir in zip(configs, dirs, strict=True)
    ]
    runs.run_parallel(
        _study_task,
        tasks,
        [cfg.steps for cfg in configs],
        jobs=jobs,
        names=[d.name for d in dirs],
        progress=progress,
        echo=echo,
    )
    return dirs


def _study_task(
    cfg: ConvnetConfig, run_dir: str, dataset: str, folder: str, progress: Callable[[int], None]
) -> None:
    """One run in a worker process: load the data from where the parent found it, then train."""
    prepared = prepare_data(data.load(dataset, folder, download=False))
    run(cfg, run_dir, prepared, progress=progress)
