"""Every setting of one run of the mechanism study: the Figure 1 run's, plus noisy BN's strength,
how often the instruments measure, (parts 3–5) the initialization, Dropout and the size of the
batches BN's statistics come from, and (part 6) a scale of the hidden weights and their own
learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import at_least, between, one_of, param, positive, positive_int
from ..mnist.config import MnistConfig

__all__ = ["NETWORKS", "MechanismConfig"]

# name -> (label in reports, BN before every hidden sigmoid)
NETWORKS = {
    "plain": ("without BN", False),
    "bn": ("with BN", True),
    "noisy": ("noisy BN", True),  # BN, then a per-unit random scale and shift every step
    "ghost": ("ghost BN", True),  # statistics of ghost batches of virtual_batch examples
    "renorm": ("Batch Renorm", True),  # the same ghost batches, with Batch Renorm's r and d
}
SMALL_BATCH = ("ghost", "renorm")  # the networks whose statistics come from virtual_batch examples


@dataclass(frozen=True)
class MechanismConfig(MnistConfig):
    """One run: an MLP of ``hidden`` sigmoid layers on binarized MNIST, plain SGD, with no BN,
    BN, or noisy BN (:class:`~batchnorm.nn.NoisyBatchNorm1d`) before every hidden sigmoid."""

    network: str = param(
        "bn", "the network: plain, bn or noisy", check=one_of(*NETWORKS), cli=False
    )
    steps: int = param(10_000, "SGD steps", check=positive_int)
    lr: float = param(1.0, "plain SGD learning rate", check=positive, sweep=True)
    eval_every: int = param(
        250, "steps between evaluations, instrument readings and checkpoints", check=positive_int
    )
    # the Figure 1 task's settings this study does not use (kept for config.json, off the CLI)
    population_batches: int = param(100, "not used by this study", check=positive_int, cli=False)
    layer_every: int = param(2_500, "not used by this study", check=positive_int, cli=False)
    noise_scale: float = param(
        1.0, "noisy BN: each step's per-unit scale s ~ U(1, noise_scale)", check=between(1.0, 100.0)
    )
    noise_shift: float = param(
        0.0, "noisy BN: each step's per-unit shift t ~ U(-noise_shift, noise_shift)",
        check=between(0.0, 100.0),
    )  # fmt: skip
    init: str = param(
        "normal",
        "initial weights: normal (N(0, init_std²) in every layer) or glorot (N(0, 2 / (fan_in + "
        "fan_out)) per layer; init_std is then not used)",
        check=one_of("normal", "glorot"),
    )
    dropout: float = param(
        0.0, "Dropout probability after every hidden sigmoid", check=between(0.0, 0.9)
    )
    virtual_batch: int = param(
        0,
        "ghost and renorm networks: examples per ghost batch that BN's statistics come from "
        "(0: the whole batch)",
        check=at_least(0),
    )
    weight_scale: float = param(
        1.0,
        "multiply the initial weights of every hidden layer by this (Sec. 3.3's a; with BN the "
        "network computes the same function, up to BN's eps)",
        check=positive,
        cli=False,
    )
    hidden_lr: float = param(
        0.0,
        "learning rate of the hidden layers' weights (0: lr); BN's parameters and the output "
        "layer keep lr",
        check=lambda v: positive(v) if v != 0 or isinstance(v, bool) else None,
        cli=False,
    )
    instruments: bool = param(
        True,
        "read Santurkar's ICS, the smoothness along the step and the scale check (parts 3-5 of "
        "the study need only accuracies)",
        cli=False,
    )
    instrument_every: int = param(
        250,
        "steps between readings of Santurkar's ICS and of the smoothness along the step (a "
        "multiple of eval_every)",
        check=positive_int,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.instrument_every % self.eval_every:
            raise self.error(
                "instrument_every",
                f"= {self.instrument_every} must be a multiple of eval_every = {self.eval_every}",
            )
        if self.validation < self.probe_examples:
            raise self.error(
                "validation",
                f"= {self.validation}: the study measures on validation images (steps to a "
                f"validation accuracy, the drift probe of {self.probe_examples} of them); hold "
                "out at least that many",
            )
        if self.network != "noisy" and (self.noise_scale, self.noise_shift) != (1.0, 0.0):
            raise self.error("noise_scale", "is noisy BN's; the network is " + self.network)
        if self.hidden_lr and self.instruments:
            raise self.error(
                "hidden_lr",
                "needs instruments off: the smoothness instrument steps along the gradient at lr, "
                "which is not this run's step",
            )
        small = self.network in SMALL_BATCH
        if small and not 2 <= self.virtual_batch < self.batch_size:
            raise self.error(
                "virtual_batch",
                f"= {self.virtual_batch}: a {self.network} network needs ghost batches of at "
                f"least 2 examples and fewer than the batch's {self.batch_size}",
            )
        if not small and self.virtual_batch:
            raise self.error(
                "virtual_batch",
                f"is for the ghost and renorm networks; the network is {self.network}",
            )

    @property
    def bn(self) -> bool:
        return NETWORKS[self.network][1]
