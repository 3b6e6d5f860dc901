"""Every setting of one convnet run (one network, one seed), with its help and its check."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
from .recipe import NETWORKS, Network, Recipe

__all__ = ["QUICK", "ConvnetConfig", "check_fits"]


def _examples(v: object) -> str | None:
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    return None if ok else f"must be a positive integer or None (all), got {v!r}"


@dataclass(frozen=True)
class ConvnetConfig(Config):
    """Every setting of one run (one network, one seed); saved to ``config.json``, checked on resume."""

    network: str = param("baseline", "the network", check=one_of(*NETWORKS), cli=False)
    seed: int = param(
        0,
        "initial weights, data order, augmentation, Dropout, population batches",
        check=at_least(0),
        cli=False,  # the command line's --seeds
    )
    dataset: str = param("fashion-mnist", "data set", check=one_of(*data.DATASETS))
    steps: int = param(10_000, "SGD steps (the same budget for every network)", check=positive_int)
    batch_size: int = param(
        32, "the paper's mini-batch size", check=at_least(2, " (BN needs m > 1)"), cli=False
    )
    eval_every: int = param(
        500, "steps between evaluations (a quarter of it in the first 4×)", check=positive_int
    )
    population_every: int = param(
        2_000,
        "steps between Alg. 2 population evaluations (BN networks)",
        check=positive_int,
        cli=False,
    )
    population_batches: int = param(
        50, "training batches of the population pass", check=positive_int, cli=False
    )
    test_examples: int | None = param(None, "evaluate on the first N test images", check=_examples)
    validation: int = param(
        5_000,
        "training images held out (the last N) to choose settings on; 0: none",
        check=at_least(0),
    )
    base: Recipe = param(Recipe(), "the Baseline's recipe; each network derives its own")
    # A study's choices on validation images: this network's own learning rate and half-life,
    # instead of those its recipe derives from the base (None: derived).
    lr: float | None = param(
        None,
        "this network's own initial learning rate (default: derived from --base-lr)",
        check=lambda v: None if v is None else positive(v),
    )
    lr_half_life: float | None = param(
        None,
        "this network's own learning-rate half-life in steps (default: derived)",
        check=lambda v: None if v is None else positive(v),
    )
    width: float = param(1.0, "channel multiplier of the network", check=between(0.25, 8))
    eps: float = param(
        1e-5, "BN's epsilon", check=between(0, 1, open_low=True, open_high=True), cli=False
    )
    bn_momentum: float = param(
        0.1, "momentum of BN's moving averages (torch's convention)", check=between(0, 1), cli=False
    )
    divergence_loss: float = param(
        1000.0, "a training loss above this (or not finite) ends the run", check=positive, cli=False
    )
    # One thread per process, with networks in parallel processes: predictable on a shared
    # machine, and part of the config because results may differ in the last bit between thread
    # counts (a resumed run must repeat the same arithmetic).
    threads: int = param(1, "intra-op threads per run", check=positive_int)
    # Data-parallel runs (torchrun): saved only when processes > 1.
    processes: int = param(1, "processes of a data-parallel run", check=positive_int, cli=False)
    bn_sync: bool = param(True, "synchronize BN statistics over the processes", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.processes > self.batch_size:
            raise self.error(
                "processes", f"= {self.processes} cannot share a batch of {self.batch_size}"
            )

    @property
    def net(self) -> Network:
        return NETWORKS[self.network]

    @property
    def recipe(self) -> Recipe:
        """This network's recipe: derived from the base one, with its own ``lr`` and
        ``lr_half_life`` where they are set."""
        r = self.net.recipe(self.base)
        own = {
            k: v for k, v in (("lr", self.lr), ("lr_half_life", self.lr_half_life)) if v is not None
        }
        return replace(r, **own) if own else r

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["recipe"] = self.recipe.to_dict()  # derived; saved so the files say what was trained
        if self.processes == 1:
            del d["processes"], d["bn_sync"]
        return d


# What --quick changes: a CI-sized study (a minute or two per network on one core) that still
# shows real properties. The learning rate decays over the short run as the full one does.
QUICK = {
    ("steps",): 600,
    ("eval_every",): 100,
    ("population_every",): 300,
    ("test_examples",): 2000,
    ("base", "lr_half_life"): 200.0,
}


def check_fits(cfg: ConvnetConfig, train_images: int, test_images: int) -> None:
    """Raise :class:`~..config.ConfigError` if a size in ``cfg`` exceeds the data set's."""
    if cfg.validation >= train_images:
        raise cfg.error(
            "validation", f"= {cfg.validation} leaves none of the {train_images} training images"
        )
    check_batch_sizes(
        type(cfg).__name__, cfg.batch_size, cfg.population_batches, train_images - cfg.validation
    )
    if cfg.test_examples is not None and cfg.test_examples > test_images:
        raise cfg.error(
            "test_examples", f"= {cfg.test_examples} exceeds the {test_images} test images"
        )
