"""The pre-registered Figure 1 study: tuned against tuned, chosen on validation images, 5 seeds.

Written before the first full run and not changed after it (the report names the commit that
last changed this file; :mod:`batchnorm.experiments.protocol`). The rules the report applies are
:data:`RULES`, implemented in :mod:`batchnorm.reporting.mnist_study`.
"""

from __future__ import annotations

from dataclasses import replace

from ..protocol import Protocol
from .config import MnistConfig

__all__ = ["RULES", "TEXT", "protocol"]

LRS = (0.1, 0.25, 0.5, 1.0, 2.0)
INIT_STDS = (0.01, 0.05, 0.1)
SEEDS = (1, 2, 3, 4, 5)  # the evaluation seeds; seed 0 is spent on selection
METRIC = {"plain": "val_acc", "bn": "val_acc_population"}
RULES = {
    "ci": 0.95,  # two-sided level of every interval
    "reading_tol": 0.0025,  # by-eye reading of Figure 1(a), as before
    "faster_fraction": 0.5,  # "rises faster": the baseline's final accuracy in ≤ half the steps
    "drift_ratio": 2.0,  # "drifts without, nearly flat with": ≥ 2× less movement with BN
    "drift_after": 0.9,  # drift measured after the network first passes 90% validation accuracy
}

TEXT = """\
**Data.** MNIST, inputs binarized at 128. The last 10,000 training images are the validation
set; the networks train on the other 50,000. Every choice below is made on validation accuracy;
the 10,000 test images are read only for the numbers reported.

**Selection (seed 0).** Both networks (without BN; with BN) on the grid lr ∈ {0.1, 0.25, 0.5,
1, 2} × init std ∈ {0.01, 0.05, 0.1}, 50,000 steps each, the same budget for both. Each network's
winner is the cell with the highest mean validation accuracy over the last 5 evaluations
(steps 48,000–50,000; with BN, population statistics of Alg. 2); ties go to the first cell in
grid order.

**Evaluation (seeds 1–5, not used for selection).** Each network at its winning setting
("tuned vs tuned"), and each network at the other's winning setting (the same-setting pairs of
Figure 1: same initial weights, same batches).

**Verdicts**, per claim, with every interval a paired two-sided 95% interval over the 5 seeds
(Student's t for means, percentile bootstrap for step counts):

1. *BN ends with a higher test accuracy* (tuned vs tuned, paired by seed): reproduced if the
   interval of the mean difference lies above 0; partly if the mean is above 0 but the interval
   contains it; not reproduced otherwise.
2. *Final accuracy ≈ 0.98–0.99 with BN, ≈ 0.96–0.97 without (by eye)*: reproduced if the
   interval of the mean meets the range widened by 0.0025; partly if it meets it widened by
   0.0075; not reproduced otherwise.
3. *BN rises faster*: per seed, the steps the tuned BN network needs to reach the tuned
   baseline's final validation accuracy (its mean over the last 5 evaluations), on the validation
   curve: reproduced if at most half the run in every seed; "partly: k of 5" if in some; not
   reproduced if in none.
4. *The sigmoid input drifts without BN and stays nearly flat with BN* (Figure 1(b, c)), in the
   same-setting pairs at both winning settings: the range of each last-layer unit's median, and of
   its 15–85 spread, over the evaluations after the network first reaches 90% validation accuracy,
   averaged over the layer's units; reproduced if the network without BN moves at least 2× as
   much in every seed at both settings; "partly: k of 10" otherwise; the range over the whole run
   (the paper's picture, dominated by the early chance-level phase) is shown beside it.
5. *Where the claims hold*: claims 1, 3 and 4 are also judged on every grid cell (seed 0, both
   networks at the cell's setting) and shown as a map over lr × init std.
"""


def _grid(base: MnistConfig, lrs, stds) -> list[tuple[str, MnistConfig]]:
    return [
        (net, replace(base, network=net, lr=lr, init_std=std, seed=0))
        for net in ("plain", "bn")
        for lr in lrs
        for std in stds
    ]


def _then(base: MnistConfig, seeds: tuple[int, ...]):
    def then(winners: dict[str, dict]) -> list[tuple[str, MnistConfig]]:
        def at(net: str, setting: dict, seed: int) -> MnistConfig:
            return replace(
                base, network=net, lr=setting["lr"], init_std=setting["init_std"], seed=seed
            )

        out = []
        for seed in seeds:
            out += [
                ("tuned", at("plain", winners["plain"], seed)),
                ("tuned", at("bn", winners["bn"], seed)),
                ("same-setting:bn", at("plain", winners["bn"], seed)),
                ("same-setting:bn", at("bn", winners["bn"], seed)),
                ("same-setting:plain", at("plain", winners["plain"], seed)),
                ("same-setting:plain", at("bn", winners["plain"], seed)),
            ]
        return out

    return then


def _protocol(
    name: str, base: MnistConfig, lrs, stds, seeds: tuple[int, ...], last: int
) -> Protocol:
    return Protocol(
        name=name,
        source=__file__,
        text=TEXT,
        grid=_grid(base, lrs, stds),
        metric=METRIC,
        last=last,
        then=_then(base, seeds),
        rules={**RULES, "seeds": list(seeds), "last": last},
    )


def protocol(base: MnistConfig, quick: bool = False) -> Protocol:
    """The study on ``base`` (the command line's other settings, such as threads); ``quick``:
    the same study at CI size (``base`` is then the --quick preset's 2,000 steps): a 2 × 2 grid,
    seeds 1 and 2, the mean over the last 3 evaluations."""
    if quick:
        small = replace(base, layer_every=500)
        return _protocol("mnist-figure1-v1-quick", small, (0.5, 2.0), (0.01, 0.1), (1, 2), 3)
    return _protocol("mnist-figure1-v1", base, LRS, INIT_STDS, SEEDS, 5)
