"""The pre-registered mechanism study, parts 1 and 2 of issue 20: is reduced internal covariate
shift the cause of BN's speed-up (the paper, Sec. 1–2), or not (Santurkar et al. 2018)? And does
BN make back-propagation scale-invariant and tolerate much higher learning rates (Sec. 3.3)?

Version 1 (part 1 alone, registered in 3d78501) ran once (``results/mechanism`` of that commit).
Version 2 adds part 2 and leaves every run, measure and rule of part 1 as they were; it was
written before any run of part 2. Each version is written before its first full run and not
changed after it (the report names the commit that last changed this file;
:mod:`batchnorm.experiments.protocol`). The report that applies :data:`RULES` is
:mod:`batchnorm.reporting.mechanism`. Parts 3–5 of the issue (saturating nonlinearities at depth,
regularization, mini-batch size) are not part of this protocol; each will be registered before
it runs.
"""

from __future__ import annotations

from dataclasses import replace

from ..protocol import Protocol
from .config import MechanismConfig

__all__ = ["ARMS", "NETS", "RULES", "STUDY_BASE", "TEXT", "protocol"]

# name -> (hidden layers, init std): the Figure 1 MLP, and a 10-layer sigmoid MLP
NETS = {"fig1": ((100,) * 3, 0.01), "deep": ((100,) * 10, 0.1)}
# name -> (network, noise_scale, noise_shift)
ARMS = {
    "plain": ("plain", 1.0, 0.0),
    "bn": ("bn", 1.0, 0.0),
    "noisy-weak": ("noisy", 1.5, 0.5),
    "noisy-strong": ("noisy", 3.0, 2.0),
}
SEEDS = (1, 2, 3)
LR_GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # part 2, log-spaced
RULES = {
    "ci": 0.95,
    "targets": [0.90, 0.95],  # validation accuracies for steps-to-target
    "main_target": 0.95,
    "fallback_target": 0.90,  # if BN does not reach the main target in every seed
    "lose_half": 0.5,  # noisy BN "loses" BN's gain if it loses at least this share of it
    "resolution": 250,  # steps: one evaluation interval, the resolution of steps-to-target
    # part 2
    "lr_grid": list(LR_GRID),
    "stable_within": 0.01,  # final validation accuracy within 1 point of the arm's best cell
    "higher_factor": 5.0,  # "much higher": BN's largest stable lr at least 5x plain's
    "scale_exact": 1e-3,  # Sec. 3.3's identities hold if every relative error is below this
}

TEXT = """\
**Question.** The paper explains BN's speed-up by reduced internal covariate shift: the inputs of
each layer stop moving as the layers below learn (Sec. 1–2, Figure 1(b, c)). Santurkar et al.
(2018) answer that BN with noise injected after it — inputs that move *more* than without BN —
trains as fast as BN, that BN does not reduce the change of a layer's gradient caused by the
update of the layers below ("ICS", their Definition 2.1), and that BN makes the loss smoother
along the step instead.

**Networks (fixed, not tuned).** Binarized MNIST, plain SGD, batch 60, lr 1.0, 10,000 steps; the
last 10,000 training images are the validation set. (a) *fig1*: the Figure 1 MLP, 784-100-100-100-10
sigmoid, weights N(0, 0.01²); (b) *deep*: 10 hidden sigmoid layers of 100, weights N(0, 0.1²).
Arms, BN (ours) before every hidden sigmoid with the hidden biases dropped: *plain* (no BN),
*bn*, *noisy-weak* and *noisy-strong* (noisy BN: after BN, each unit's output is scaled by
s ~ U(1, n_s) and shifted by t ~ U(−n_t, n_t), drawn afresh every training step; (n_s, n_t) =
(1.5, 0.5) and (3, 2); off in inference). Seeds 1, 2, 3: within a seed every arm starts from the
same weight matrices and sees the same batches.

**Measures.** Every 250 steps: validation and test accuracy (inference mode); Santurkar's ICS of
every linear layer after the first (the hidden ones and the output layer), ‖G_k − G'_k‖ / ‖G_k‖
and cos(G_k, G'_k), the update being the run's own SGD step, on the batch the run trains on next; the effective β-smoothness along the gradient (step sizes lr ×
[0.05, 4]); and the distributions of every hidden sigmoid's input on 1,000 validation images in
training mode (noise on). Per run: steps to 90% and 95% validation accuracy (the first
evaluation at or above; a run that never reaches a target counts as 10,000 steps, a lower
bound, and says so); ICS = the mean over those layers and over the readings from step 250
on; β = the median over the readings from step 250 on; drift = the median over consecutive records of each
sigmoid input's change per 1,000 steps (2-Wasserstein distance of the Gaussians of its mean and
std, in the unit's typical std, median over units), averaged over the hidden layers, from step
250 on.

**Verdicts, per network and noise strength** (paired by seed; "in every seed" means all 3).

1. *Supports the ICS explanation* if noisy BN loses at least half of BN's gain in steps to 95%
   (mean over seeds: steps(noisy) − steps(BN) ≥ ½ (steps(plain) − steps(BN))) and BN has a
   lower ICS than plain in every seed.
2. *Supports Santurkar* if noisy BN's mean steps to 95% is within BN's seed range (min–max,
   widened by one evaluation interval, 250 steps) while its sigmoid inputs drift more than
   BN's in every seed.
3. *BN reduces Santurkar's ICS*: BN's ICS below plain's in every seed: yes; in some: "partly:
   k of 3"; in none: no (Santurkar et al. found it not reduced).
4. *BN makes the loss smoother along the step*: BN's β below plain's in every seed: yes;
   "partly: k of 3"; no.
5. *BN is faster*: BN's steps to 95% below plain's in every seed: yes; "partly: k of 3"; no.

The comparisons 1, 2 and 5 use 95%; if BN does not reach 95% in every seed of a network, they
use 90% for it and say so; if BN does not reach 90% either, they are not decided ("no target").
Neither 1 nor 2 may hold (then: "neither"); both cannot, as 1 needs noisy BN to be slower than
BN by at least half of BN's gain and 2 needs it within BN's range, unless BN's gain is smaller
than the range (then: "undecided: BN's gain is within its seed spread").

**Part 2: scale invariance and learning rates (Sec. 3.3).** The fig1 network without BN and with
BN, lr ∈ {0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50}, seeds 1–3, 10,000 steps, measured as in
part 1 (the lr 1 cells are part 1's fig1 runs). A run whose training loss becomes non-finite
stops as diverged.
Measures: the final validation accuracy; at step 0, for every hidden layer and a ∈ {0.1, 10},
the relative errors of a · ∂L/∂(aW) against ∂L/∂W and of the gradient reaching the layer's input
(W → aW, everything else fixed); the norm of every hidden weight matrix at every evaluation.
A cell (network, lr) is *stable* if no seed diverged and its mean final validation accuracy is
within 1 point of that network's best cell; a network's stable range is the run of consecutive
stable cells of the grid that holds its best cell (its lowest and largest lr).

6. *Gradients ∝ 1/a, the Jacobian unchanged (Sec. 3.3, an exact identity up to BN's ε)*: with
   BN, holds if every error at step 0 for a = 10 (all seeds and layers) is below 1e-3. At
   a = 0.1 the variance of Wu shrinks 100× towards ε (1e-5), which breaks the identity by a
   relative O(ε/σ²); its errors are reported beside, as are those without BN (where the
   identity does not hold). (Set after the 1,500-step quick run showed errors of 0.4 at a = 0.1
   and before any full run of part 2. The same quick run showed 1.2e-2 at a = 10: at this init,
   std 0.01, σ² of Wu is itself small against ε; the 1e-3 threshold was kept.)
7. *BN allows much higher learning rates*: reproduced if BN's largest stable lr is at least 5×
   plain's; partly if larger but less than 5×; not reproduced otherwise. The report gives each
   network's stable range (its lowest and largest stable lr).
8. The weight norms are reported (their growth from step 0 to the end at lr 1 and at each
   network's largest stable lr), without a verdict.
"""


def _runs(
    base: MechanismConfig, nets: dict, arms: dict, seeds
) -> list[tuple[str, MechanismConfig]]:
    out = []
    for net, (hidden, std) in nets.items():
        for arm, (network, scale, shift) in arms.items():
            for seed in seeds:
                cfg = replace(
                    base, network=network, hidden=hidden, init_std=std, noise_scale=scale,
                    noise_shift=shift, seed=seed,
                )  # fmt: skip
                out.append((f"{net}:{arm}", cfg))
    return out


def _lr_runs(base: MechanismConfig, grid, seeds) -> list[tuple[str, MechanismConfig]]:
    hidden, std = NETS["fig1"]
    out = []
    for arm in ("plain", "bn"):
        for lr in grid:
            for seed in seeds:
                cfg = replace(base, network=arm, hidden=hidden, init_std=std, lr=lr, seed=seed)
                out.append((f"lr:{arm}:{lr:g}", cfg))
    return out


def protocol(base: MechanismConfig, quick: bool = False) -> Protocol:
    """The study on ``base`` (the command line's other settings, such as threads); ``quick``:
    the same arms at CI size (``base`` is then the --quick preset): the fig1 network only, seed
    1, and four learning rates."""
    if quick:
        grid = (0.2, 1.0, 5.0, 50.0)
        runs = _runs(base, {"fig1": NETS["fig1"]}, ARMS, (1,)) + _lr_runs(base, grid, (1,))
        rules = {**RULES, "seeds": [1], "lr_grid": list(grid)}
        name = "mechanism-v2-quick"
    else:
        runs = _runs(base, NETS, ARMS, SEEDS) + _lr_runs(base, LR_GRID, SEEDS)
        rules = {**RULES, "seeds": list(SEEDS)}
        name = "mechanism-v2"
    return Protocol(
        name=name, source=__file__, text=TEXT, grid=runs, metric={}, last=1,
        then=lambda winners: [], rules=rules,
    )  # fmt: skip


STUDY_BASE = MechanismConfig()
