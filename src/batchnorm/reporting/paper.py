"""The paper's numbers, in one place (arXiv:1502.03167; restated in the project's paper notes).

Figure 1 prints no numbers: its accuracies are read off the plot by eye. Figure 3 is a table.
"""

from __future__ import annotations

__all__ = [
    "FIGURE1",
    "FIGURE1_READING_TOL",
    "FIGURE1_STEPS",
    "FIGURE3",
    "FIGURE3_FACTOR",
    "FIGURE3_LABELS",
    "FIGURE3_NETWORKS",
]

# Figure 1(a), by eye, at 50K steps: test accuracy with and without BN.
FIGURE1 = {"bn": (0.98, 0.99), "plain": (0.96, 0.97)}
FIGURE1_STEPS = 50_000
# A by-eye reading of a 0.7-1.0 axis is good to about half a percentage point: within this of the
# range counts as reproduced, within 3x as partly.
FIGURE1_READING_TOL = 0.0025

# Figure 3 (ImageNet, single crop): steps to reach Inception's best (72.2%), and each network's
# best; Sec. 4.2.2 for the two failures. Keyed by this project's network names.
FIGURE3 = {
    "baseline": {"steps": 31.0e6, "best": 0.722},
    "bn-baseline": {"steps": 13.3e6, "best": 0.727},
    "bn-x5": {"steps": 2.1e6, "best": 0.730},
    "bn-x30": {"steps": 2.7e6, "best": 0.748},
    "bn-x5-sigmoid": {"steps": None, "best": 0.698},
    "baseline-x5": {"outcome": "diverged (parameters reached machine infinity)"},
    "baseline-sigmoid": {"outcome": "stayed at chance (1/1000)"},
}
FIGURE3_FACTOR = {
    n: FIGURE3["baseline"]["steps"] / FIGURE3[n]["steps"]
    for n in ("bn-baseline", "bn-x5", "bn-x30")
}
# The paper's networks, in its order (its claims are about these), and its names for them.
FIGURE3_NETWORKS = tuple(FIGURE3)
FIGURE3_LABELS = {
    "baseline": "Inception",
    "bn-baseline": "BN-Baseline",
    "bn-x5": "BN-x5",
    "bn-x30": "BN-x30",
    "bn-x5-sigmoid": "BN-x5-Sigmoid",
}
