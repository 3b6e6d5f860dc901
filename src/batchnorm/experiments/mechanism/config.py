"""Every setting of one run of the mechanism study: the Figure 1 run's, plus noisy BN's strength
and how often the instruments measure."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import between, one_of, param, positive, positive_int
from ..mnist.config import MnistConfig

__all__ = ["NETWORKS", "MechanismConfig"]

# name -> (label in reports, BN before every hidden sigmoid)
NETWORKS = {
    "plain": ("without BN", False),
    "bn": ("with BN", True),
    "noisy": ("noisy BN", True),  # BN, then a per-unit random scale and shift every step
}


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

    @property
    def bn(self) -> bool:
        return NETWORKS[self.network][1]
