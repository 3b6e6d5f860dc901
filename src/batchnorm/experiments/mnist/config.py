"""Every setting of one Figure 1 run (one network, one seed), with its help and its check."""

from __future__ import annotations

from dataclasses import dataclass

from ... import data
from ..config import (
    Config,
    at_least,
    between,
    check_batch_sizes,
    one_of,
    param,
    positive,
    positive_int,
)

__all__ = ["DATASETS", "NETWORKS", "MnistConfig", "check_fits"]

# The 28×28 grayscale sets whose 784 binarized pixels the MLP takes.
DATASETS = tuple(name for name, spec in data.DATASETS.items() if spec.format == "idx")
# The networks of Figure 1: name -> (label in reports, BN before every hidden sigmoid)
NETWORKS = {"plain": ("without BN", False), "bn": ("with BN", True)}


def _hidden(v: object) -> str | None:
    ok = isinstance(v, tuple) and v and all(isinstance(h, int) and h >= 1 for h in v)
    return None if ok else f"must be a non-empty list of positive sizes, got {v!r}"


@dataclass(frozen=True)
class MnistConfig(Config):
    """Every setting of one run; saved to ``config.json`` and compared on resume."""

    network: str = param(
        "bn", "the network: bn (with BN) or plain", check=one_of(*NETWORKS), cli=False
    )
    steps: int = param(50_000, "SGD steps (the paper: 50,000)", check=positive_int)
    batch_size: int = param(
        60, "examples per mini-batch (the paper: 60)", check=at_least(2, " (BN needs m > 1)")
    )
    # Not in the paper (the report shows how the result moves with them):
    lr: float = param(0.5, "plain SGD learning rate", check=positive, sweep=True)
    init_std: float = param(
        0.01,
        'std of the Gaussian initial weights ("small random Gaussian values")',
        check=positive,
        sweep=True,
    )
    eps: float = param(1e-5, "BN's epsilon", check=positive, sweep=True)
    bn_momentum: float = param(
        0.1, "momentum of BN's moving-average statistics (torch's convention)", check=between(0, 1)
    )
    seed: int = param(
        0,
        "initial weights, data order and population batches derive from it",
        check=at_least(0),
        cli=False,  # the command line's --seeds
    )
    eval_every: int = param(500, "steps between evaluations and checkpoints", check=positive_int)
    population_batches: int = param(
        100, "training batches of the Alg. 2 population pass at each evaluation", check=positive_int
    )
    validation: int = param(
        10_000,
        "training images held out (the last N) to choose settings on; 0: none",
        check=at_least(0),
    )
    layer_every: int = param(
        2_500,
        "steps between records of every last-layer unit's percentiles (the drawn unit's: every "
        "evaluation)",
        check=positive_int,
    )
    probe_unit: int = param(0, "the last-hidden-layer unit drawn in Figure 1(b, c)", cli=False)
    probe_examples: int = param(
        1000,
        "the fixed held-out batch of Figure 1(b, c): the first N test images",
        cli=False,
        check=positive_int,
    )
    binarize_threshold: int = param(
        128, "pixel >= threshold -> 1.0", check=between(1, 255), cli=False
    )
    hidden: tuple[int, ...] = param((100, 100, 100), "hidden layer sizes", check=_hidden, cli=False)
    dataset: str = param("mnist", "data set", check=one_of(*DATASETS))
    # At 60×100 activations a second thread gains about 20% on a quiet machine, but on a busy one
    # spinning OpenMP threads made each step several times slower (benchmarks/README.md); one
    # thread is predictable. Part of the config: matmul results may differ in the last bit
    # between thread counts, and a resumed run must match.
    threads: int = param(1, "intra-op threads while training", check=positive_int)
    # Data-parallel runs (torchrun): saved only when processes > 1, so a single-process
    # config.json is what it always was.
    processes: int = param(1, "processes of a data-parallel run", check=positive_int, cli=False)
    bn_sync: bool = param(True, "synchronize BN statistics over the processes", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.probe_unit < self.hidden[-1]:
            raise self.error(
                "probe_unit", f"must be in [0, {self.hidden[-1]}), got {self.probe_unit}"
            )
        if self.processes > self.batch_size:
            raise self.error(
                "processes", f"= {self.processes} cannot share a batch of {self.batch_size}"
            )

    @property
    def bn(self) -> bool:
        return NETWORKS[self.network][1]

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.processes == 1:
            del d["processes"], d["bn_sync"]
        return d


def check_fits(cfg: MnistConfig, train_images: int, test_images: int) -> None:
    """Raise :class:`~..config.ConfigError` if a size in ``cfg`` exceeds the data set's."""
    if cfg.validation >= train_images:
        raise cfg.error(
            "validation", f"= {cfg.validation} leaves none of the {train_images} training images"
        )
    check_batch_sizes(
        type(cfg).__name__, cfg.batch_size, cfg.population_batches, train_images - cfg.validation
    )
    if cfg.probe_examples > test_images:
        raise cfg.error(
            "probe_examples", f"= {cfg.probe_examples} exceeds the {test_images} test images"
        )
