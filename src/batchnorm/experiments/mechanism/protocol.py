"""The pre-registered mechanism study of issue 20. Part 1: is reduced internal covariate shift the
cause of BN's speed-up (the paper, Sec. 1–2), or not (Santurkar et al. 2018)? Part 2: does BN
make back-propagation scale-invariant and tolerate much higher learning rates (Sec. 3.3)?

Version 1 (part 1 alone, registered in 3d78501) ran once (``results/mechanism`` of that commit).
Version 2 (4901065) adds part 2 and leaves every run, measure and rule of part 1 as they were; it
was written before any run of part 2, and ran once (``results/mechanism`` of fbf8565). Version 3
adds parts 3–5 of issue 20 (saturating nonlinearities at depth, regularization, the mini-batch
size), written before any run of them, and leaves every run, measure and rule of parts 1–2 as
they were (the runs gain a ``train_acc`` reading, which changes no other number). Version 4 adds
part 6 (does scaling the weights into BN by a train like lr / a² on them? Sec. 3.3), written
before any run of it, and leaves every run, measure and rule of parts 1–5 as they were. Each
version is written before its first full run and not changed after it (the report names the commit that
last changed this file; :mod:`batchnorm.experiments.protocol`). The report that applies
:data:`RULES` is :mod:`batchnorm.reporting.mechanism`.
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
DEPTHS = (3, 5, 10, 20)  # part 3: hidden sigmoid layers of 100, Glorot's init
DEPTH_LRS = (0.1, 0.5, 2.0)  # part 3: each network's best on validation
DROPOUT = (0.0, 0.2, 0.5)  # part 4 (0: part 1's fig1 runs)
GHOST = (2, 4, 8, 16, 60)  # part 5: examples per ghost batch (60, the whole batch: part 1's BN)
RENORM_AT = (2, 4)  # part 5: Batch Renorm over ghost batches of these sizes
SCALE_AT = (0.1, 10.0)  # part 6: the scales a of the hidden weights
SCALE_SEEDS = (1, 2, 3, 4, 5)  # part 6: an equivalence needs a narrow interval, and runs are cheap
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
    # parts 3-5
    "depths": list(DEPTHS),
    "depth_lrs": list(DEPTH_LRS),
    "deep": [10, 20],  # the depths where plain sigmoid networks are expected to fail
    "depth_keeps": 0.05,  # BN "trains at depth": its deepest net within 5 points of its depth 3
    "dropout": list(DROPOUT),
    "ghost": list(GHOST),
    "renorm_at": list(RENORM_AT),
    "small": [2, 4],  # Wu & He: degradation below about 8 ghost examples
    "large": 16,  # ... and none at 16
    # part 6
    "scale_at": list(SCALE_AT),
    "scale_seeds": list(SCALE_SEEDS),
    "equivalent_within": 0.005,  # |scaled − lr/a² on the hidden weights| interval inside ±0.5 pt
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

**Parts 3–5 (version 3).** Seeds 1–3, 10,000 steps, batch 60, measured as in part 1 without the
ICS, smoothness and scale readings (accuracies, drift and weight norms only), plus the accuracy
on the first 10,000 training images (inference mode) at every evaluation. Differences are paired
by seed: mean with a t 95% interval over the 3 seeds ("above 0" / "below 0": the whole interval).
"Final" is the last evaluation, step 10,000.

*Part 3: saturating nonlinearities at depth (Sec. 4.2.1).* Sigmoid MLPs of 3, 5, 10 and 20
hidden layers of 100, Glorot's initialization (N(0, 2 / (fan_in + fan_out)) per layer, the same
draw for both networks of a seed), without BN and with BN, each at lr ∈ {0.1, 0.5, 2}. Each
(depth, network) takes its lr with the highest mean final validation accuracy over the seeds
(ties: the smaller lr; a cell with a diverged seed is not chosen); the comparisons use the final
test accuracy of the chosen cells (chosen on the same seeds for both networks; the selection's
optimism is the same for both).

9. *BN lets saturating networks train at depth*: reproduced if, at depths 10 and 20, BN − plain
   has an interval above 0 and BN's depth-20 accuracy is within 5 points of its depth-3 one;
   partly if the interval is above 0 at depth 20 only, or BN loses more than 5 points from depth
   3 to 20 while beating plain; not reproduced if at depth 20 the interval is not above 0. The
   report gives every depth's difference and each network's chosen lr.

*Part 4: regularization (Sec. 3.4).* The fig1 network (part 1's settings) without and with BN,
Dropout p ∈ {0, 0.2, 0.5} after every hidden sigmoid (p = 0: part 1's runs). Measures: final test
accuracy and the train–test gap (final accuracy on the 10,000 training images − test accuracy).

10. *BN regularizes*: yes if plain's gap − BN's gap (both p = 0) has an interval above 0; "no:
    BN's gap is larger" if below 0; "not distinguishable" otherwise.
11. *BN reduces the need for Dropout*: for each network, Dropout *helps* if p = 0.2 or p = 0.5
    minus p = 0 (final test accuracy) has an interval above 0. Reproduced if it helps plain and
    not BN; not reproduced if it helps BN; "not tested" if it helps neither (Dropout is not
    needed here, with or without BN).

*Part 5: the mini-batch size of the statistics.* The fig1 network with BN, the batch of 60 split
into ghost batches of 2, 4, 8, 16 examples (the last one of 8 and 16 holds what is left, 4 and
12; our GhostBatchNorm1d: each ghost batch normalized with its own statistics, the moving
averages updated once per step with the whole batch's); 60
is part 1's BN run; and Batch Renorm (Ioffe 2017: r_max 3, d_max 5, after 500 steps of plain
ghost BN) over ghost batches of 2 and 4. Measures: final test accuracy and steps to 95%.

12. *BN degrades with small batches* (Wu & He 2018: below about 8): reproduced if ghost 2 and
    ghost 4 − BN (60) have intervals below 0 and ghost 16 − BN (60) has not; partly if ghost 2
    alone has it below 0 or ghost 16 is also worse; not reproduced if ghost 2's is not below 0.
13. *Batch Renorm recovers part of it*: renorm k − ghost k above 0 for k = 2 and 4: reproduced;
    at one of them: "partly: 1 of 2"; at neither: not reproduced.

**Part 6 (version 4): the scale of the weights as a learning rate (Sec. 3.3).** With BN after a
hidden layer, the loss is the same for W and aW and its gradient is 1/a times as large, so SGD
from aW at lr η moves W/a as SGD from W at lr η / a² would: exactly, up to BN's ε (the scaled
network is the unscaled one with ε / a²) and floating-point rounding, whose effects SGD may
amplify over 10,000 steps. It holds only for the weights BN follows; its γ and β and the output
layer keep lr η. The fig1 network with BN (part 1's settings, lr 1), seeds 1–5, a ∈ {0.1, 10},
four runs per (a, seed): *scaled*, the hidden weights of the seed's initial draw multiplied by
a; *hidden-lr*, unscaled, the hidden weights at lr 1 / a² and every other parameter at lr 1;
*all-lr*, unscaled, every parameter at lr 1 / a² (the reading that forgets γ, β and the output
layer); *hidden-lr-eps*, as hidden-lr with BN's ε / a² (the scaled run's exact twin, but for
rounding, in training mode; in inference mode both start from BN's moving averages 0 and 1,
so there they differ at step 0 and by a share that decays as 0.9^t after). Measured as in parts
3–5. Per seed: the final test accuracy, the largest |difference| of validation accuracy over
the evaluations, and the largest relative difference of each hidden weight matrix's norm,
‖V‖ / a against ‖W‖, over the evaluations after step 0 (the norms are recorded to 6 decimals,
so differences below about 1e-6 are the record's rounding).

14. *Scaling the weights into BN by a trains them as lr / a² would*: at a given a, "equivalent"
    if no seed diverged in either run and the paired t 95% interval of the final test accuracy,
    scaled − hidden-lr, lies inside ±0.5 point. Equivalent at both a: reproduced; at one: "partly:
    at a = …"; at neither: not reproduced. At a = 0.1, ε / a² = 1e-3 is larger than the batch
    variance of Wu at this init in hidden layers 2–3 (about 4e-4; 6e-3 in layer 1) until the
    weights grow, so the equivalence may stop there. Reported beside
    without a verdict: scaled − all-lr with its interval, and the per-seed largest differences.
15. *What separates them is BN's ε*: the same test, scaled against hidden-lr-eps: equivalent at
    both a: yes; at one: "partly: at a = …"; at neither: no.
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


def _later_runs(
    base: MechanismConfig, depths, depth_lrs, dropout, ghost, renorm_at, seeds
) -> list[tuple[str, MechanismConfig]]:
    """Parts 3–5: depth, Dropout and ghost batches. Their cells without Dropout or ghost batches
    are part 1's fig1 runs (the same configs: they train once)."""
    part1 = replace(base, hidden=NETS["fig1"][0], init_std=NETS["fig1"][1])
    fig1 = replace(part1, instruments=False)
    out = []
    for seed in seeds:
        for depth in depths:
            for arm in ("plain", "bn"):
                for lr in depth_lrs:
                    cfg = replace(
                        base, network=arm, hidden=(100,) * depth, init="glorot", lr=lr,
                        instruments=False, seed=seed,
                    )  # fmt: skip
                    out.append((f"depth:{depth}:{arm}:{lr:g}", cfg))
        for arm in ("plain", "bn"):
            for p in dropout:
                cfg = replace(fig1, dropout=p) if p else part1
                out.append((f"dropout:{arm}:{p:g}", replace(cfg, network=arm, seed=seed)))
        for k in ghost:
            small = k < base.batch_size
            cfg = replace(fig1, network="ghost", virtual_batch=k) if small else part1
            out.append((f"batch:ghost:{k}", replace(cfg, seed=seed) if small else
                        replace(cfg, network="bn", seed=seed)))  # fmt: skip
        for k in renorm_at:
            cfg = replace(fig1, network="renorm", virtual_batch=k, seed=seed)
            out.append((f"batch:renorm:{k}", cfg))
    return out


def _scale_runs(base: MechanismConfig, scales, seeds) -> list[tuple[str, MechanismConfig]]:
    """Part 6: per (a, seed), the fig1 BN network scaled by a, and unscaled at lr / a² on its
    hidden weights only, on every parameter, and on its hidden weights with BN's ε / a²."""
    fig1 = replace(
        base, network="bn", hidden=NETS["fig1"][0], init_std=NETS["fig1"][1], instruments=False
    )
    out = []
    for seed in seeds:
        for a in scales:
            lr = float(f"{base.lr / a**2:.12g}")  # 100, not 99.99999999999999
            out += [
                (f"scale:{a:g}:scaled", replace(fig1, weight_scale=a, seed=seed)),
                (f"scale:{a:g}:hidden-lr", replace(fig1, hidden_lr=lr, seed=seed)),
                (f"scale:{a:g}:all-lr", replace(fig1, lr=lr, seed=seed)),
                (f"scale:{a:g}:hidden-lr-eps", replace(
                    fig1, hidden_lr=lr, eps=float(f"{base.eps / a**2:.12g}"), seed=seed
                )),
            ]  # fmt: skip
    return out


def protocol(base: MechanismConfig, quick: bool = False) -> Protocol:
    """The study on ``base`` (the command line's other settings, such as threads); ``quick``:
    the same arms at CI size (``base`` is then the --quick preset): the fig1 network only, seed
    1, four learning rates, depths 3 and 10 at two learning rates, Dropout 0.5, ghost batches of
    4 and Batch Renorm over them, the weight scale a = 10."""
    if quick:
        grid = (0.2, 1.0, 5.0, 50.0)
        runs = _runs(base, {"fig1": NETS["fig1"]}, ARMS, (1,)) + _lr_runs(base, grid, (1,))
        later = {"depths": [3, 10], "depth_lrs": [0.5, 2.0], "dropout": [0.0, 0.5],
                 "ghost": [4, 60], "renorm_at": [4]}  # fmt: skip
        runs += _later_runs(base, **later, seeds=(1,)) + _scale_runs(base, (10.0,), (1,))
        rules = {**RULES, "seeds": [1], "lr_grid": list(grid), **later, "deep": [10],
                 "small": [4], "large": 4, "scale_at": [10.0], "scale_seeds": [1]}  # fmt: skip
        name = "mechanism-v4-quick"
    else:
        runs = _runs(base, NETS, ARMS, SEEDS) + _lr_runs(base, LR_GRID, SEEDS)
        runs += _later_runs(base, DEPTHS, DEPTH_LRS, DROPOUT, GHOST, RENORM_AT, SEEDS)
        runs += _scale_runs(base, SCALE_AT, SCALE_SEEDS)
        rules = {**RULES, "seeds": list(SEEDS)}
        name = "mechanism-v4"
    return Protocol(
        name=name, source=__file__, text=TEXT, grid=runs, metric={}, last=1,
        then=lambda winners: [], rules=rules,
    )  # fmt: skip


STUDY_BASE = MechanismConfig()
