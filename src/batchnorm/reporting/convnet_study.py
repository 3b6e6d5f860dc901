"""The report of the pre-registered convnet study (``batchnorm reproduce convnet`` without
run-choosing flags), from the study folder's files alone.

``study.json`` holds the protocol as registered (text, selection metric, the rules' thresholds,
the grid) and, once the grid has run, the winners and each run's role. This module recomputes
the winners with the study's rule (:func:`batchnorm.runfiles.select`), says if they differ from
the recorded ones, and applies the registered verdict rules (``experiments/convnet/protocol.py``)
to the evaluation seeds. It writes ``report.md``, ``study_figure2`` and ``study_factors``.

Readings of the protocol's text that it leaves open, fixed here before any evaluation run of the
full study existed:

- a *condition* is a role of ``study.json`` (``tuned``, ``paper``, ``decay:<s>``, ``control``,
  ``budget:<steps>``); every condition at the study's budget is measured against the tuned
  Baseline (role ``tuned``), and each budget against its own Baseline (the Baseline of that
  budget's role), whose mean best validation accuracy over its seeds is that budget's target T;
- "faster" in a seed: the network reaches T, and the Baseline of that seed reaches it later or
  never; a factor is defined where both reach it;
- claim 3 compares the Baseline, BN-Baseline, BN-x5 and BN-x30 (the paper's networks run with
  every seed); "the next" is the one with the second-highest mean;
- claim 4's T − 1 point is read on validation, like T; a network that never reaches it takes
  "more steps" than one that does.

An unfinished study gets a report of its finished runs, marked as such, so that it can be read
while the rest trains; its verdicts are not the study's.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import runfiles
from .._atomic import write_text
from .common import ReportError, band, figure, first_step, save_figure, template
from .convnet import STYLE, ConvRun, control_verdicts
from .paper import FIGURE3_FACTOR as PAPER_FACTOR
from .paper import FIGURE3_LABELS
from .stats import Interval, bootstrap, mean_interval

__all__ = ["write_study_report"]

VAL, TEST = "val_acc", "test_acc"
PAPER_NETS = ("bn-baseline", "bn-x5", "bn-x30")
LABEL = {"bn-accelerated": "BN, tuned"}  # the tuned BN network, beside its config's own label
TUNED_COLOR = "C9"


# -- the study's files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    folder: Path
    doc: dict
    runs: dict[str, ConvRun]  # by folder name

    @property
    def rules(self) -> dict:
        return self.doc["protocol"]["rules"]

    @property
    def roles(self) -> dict[str, list[str]]:
        return self.doc.get("roles", {})

    def grid(self, family: str) -> list[ConvRun]:
        return [self.runs[n] for n in self.doc["protocol"]["grid"][family] if n in self.runs]

    def of(self, role: str, network: str) -> dict[int, ConvRun]:
        """{seed: run} of ``network``'s finished runs in ``role``."""
        out = {}
        for name in self.roles.get(role, []):
            r = self.runs.get(name)
            if r is not None and r.complete and r.net == network:
                out[r.seed] = r
        return dict(sorted(out.items()))

    def missing(self) -> list[str]:
        """Runs named by ``study.json`` that have not finished."""
        names = [n for names in self.doc["protocol"]["grid"].values() for n in names]
        names += [n for names in self.roles.values() for n in names]
        return [n for n in dict.fromkeys(names) if not (n in self.runs and self.runs[n].complete)]

    def done(self, role: str) -> bool:
        """Every run of ``role`` has finished."""
        missing = set(self.missing())
        return all(n not in missing for n in self.roles.get(role, []))

    def reference(self, role: str) -> str:
        """The role whose Baseline a condition is measured against."""
        return role if role.startswith("budget:") else "tuned"

    def target(self, role: str) -> float | None:
        """T of a condition: its Baseline's best validation accuracy, mean over seeds."""
        base = self.of(self.reference(role), "baseline")
        return statistics.fmean(best(r, VAL) for r in base.values()) if base else None

    def label(self, network: str) -> str:
        if network in LABEL:
            return LABEL[network]
        found = (r.label for r in self.runs.values() if r.net == network)
        return next(found, FIGURE3_LABELS.get(network, network))


def best(run: ConvRun, key: str) -> float:
    return max(run.series(key)[1])


def reach(run: ConvRun, key: str, threshold: float) -> int | None:
    return first_step(*run.series(key), threshold)


# -- measures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factor:
    """Steps to a threshold of one network in one condition, seed by seed, against the
    condition's Baseline of the same seed."""

    seeds: list[int]
    own: list[int | None]
    base: list[int | None]

    @property
    def factors(self) -> list[float]:
        return [b / o for o, b in zip(self.own, self.base, strict=True) if o and b]

    @property
    def faster(self) -> int:
        return sum(
            o is not None and (b is None or o < b) for o, b in zip(self.own, self.base, strict=True)
        )

    @property
    def reached(self) -> int:
        return sum(o is not None for o in self.own)

    def interval(self, resamples: int) -> Interval | None:
        f = self.factors
        return bootstrap(f, statistics.fmean, resamples=resamples) if f else None


def factor(study: Study, role: str, network: str, key: str, threshold: float) -> Factor:
    base = study.of(study.reference(role), "baseline")
    runs = {s: r for s, r in study.of(role, network).items() if s in base}
    return Factor(
        list(runs),
        [reach(r, key, threshold) for r in runs.values()],
        [reach(base[s], key, threshold) for s in runs],
    )


def paired_best(
    study: Study, role: str, network: str, other_role: str, other: str
) -> Interval | None:
    """Mean paired difference of best test accuracy, ``network`` − ``other``, with its t interval."""
    a, b = study.of(role, network), study.of(other_role, other)
    diffs = [best(a[s], TEST) - best(b[s], TEST) for s in a if s in b]
    return mean_interval(diffs, study.rules["ci"]) if diffs else None


def _fmt_iv(iv: Interval | None, unit: str = "×", digits: int = 1) -> str:
    if iv is None:
        return "—"
    if iv.low is None:
        return f"{iv.value:.{digits}f}{unit} (n={iv.n})"
    return f"{iv.value:.{digits}f}{unit} [{iv.low:.{digits}f}, {iv.high:.{digits}f}] (n={iv.n})"


def _fmt_pt(iv: Interval | None) -> str:
    return "—" if iv is None else iv.fmt(100, 2, " pt")


def _fmt_steps(values: Sequence[int | None]) -> str:
    return ", ".join("never" if v is None else f"{v:,}" for v in values) or "—"


def _fmt_factor(f: Factor, resamples: int) -> str:
    if not f.seeds:
        return "—"
    n = len(f.seeds)
    if not f.factors:
        base = sum(b is not None for b in f.base)
        return f"— (reached in {f.reached} of {n} seeds, by the Baseline in {base})"
    text = _fmt_iv(f.interval(resamples))
    if len(f.factors) < len(f.seeds):
        text += f"; defined in {len(f.factors)} of {len(f.seeds)} seeds"
    return text


def _acc(runs: dict[int, ConvRun], key: str = TEST) -> str:
    vals = [best(r, key) for r in runs.values()]
    if not vals:
        return "—"
    iv = mean_interval(vals)
    if iv.low is None:
        return f"{100 * iv.value:.2f}%"
    return f"{100 * iv.value:.2f}% [{100 * iv.low:.2f}, {100 * iv.high:.2f}]"


# -- verdicts -------------------------------------------------------------------------------------


def _count(k: int, n: int) -> str:
    if n and k == n:
        return "reproduced"
    return f"partly: {k} of {n}" if k else f"not reproduced (0 of {n})"


def _speedup(study: Study, role: str, network: str, paper: float) -> tuple[str, str, str]:
    rules, t = study.rules, study.target(role)
    f = factor(study, role, network, VAL, t)
    n = len(f.seeds)
    claim = f"1. {study.label(network)} reaches the Baseline's best in {paper:.1f}× fewer steps" + (
        " (the paper's BN-x5)" if network == "bn-accelerated" else ""
    )
    if not n:
        return claim, "no finished seed", "pending"
    iv = f.interval(rules["bootstrap"])
    measured = (
        f"steps to T = {100 * t:.2f}% (validation): {_fmt_steps(f.own)}, the Baseline "
        f"{_fmt_steps(f.base)} (seeds {f.seeds}); factor {_fmt_factor(f, rules['bootstrap'])}; "
        f"faster in {f.faster} of {n}"
    )
    floor = paper / rules["factor_tolerance"]
    if f.reached == n and iv is not None and iv.value >= floor:
        return claim, measured, "reproduced"
    if f.faster:
        size = "—" if iv is None else f"{iv.value:.1f}×"
        return claim, measured, f"partly: faster in {f.faster} of {n} seeds, factor {size}"
    return claim, measured, "not reproduced (faster in no seed)"


def verdicts(study: Study) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) for each registered claim, on the finished runs."""
    rules = study.rules
    out = [_speedup(study, "paper", n, PAPER_FACTOR[n]) for n in PAPER_NETS]
    out.append(_speedup(study, "tuned", "bn-accelerated", PAPER_FACTOR["bn-x5"]))

    diffs = {n: paired_best(study, "paper", n, "tuned", "baseline") for n in PAPER_NETS}
    done = {n: d for n, d in diffs.items() if d is not None}
    out.append(
        (
            "2. BN-Baseline, BN-x5 and BN-x30 all end above the Baseline's best (best test "
            "accuracy, paired over seeds)",
            "; ".join(f"{study.label(n)} − Baseline {_fmt_pt(d)}" for n, d in done.items()) or "—",
            _count(sum(d.above for d in done.values()), len(PAPER_NETS))
            if len(done) == len(PAPER_NETS)
            else "pending",
        )
    )

    nets = [("tuned", "baseline")] + [("paper", n) for n in PAPER_NETS]
    means = {
        n: statistics.fmean(best(r, TEST) for r in study.of(role, n).values())
        for role, n in nets
        if study.of(role, n)
    }
    claim3 = "3. BN-x30 ends with the highest accuracy of all"
    if len(means) < len(nets):
        out.append((claim3, "—", "pending"))
    else:
        ranked = sorted(means, key=means.get, reverse=True)
        nxt = ranked[1] if ranked[0] == "bn-x30" else ranked[0]
        d = paired_best(study, "paper", "bn-x30", "tuned" if nxt == "baseline" else "paper", nxt)
        verdict = (
            ("reproduced" if d is not None and d.above else "partly (highest; the interval "
             "against the next contains 0)")
            if ranked[0] == "bn-x30"
            else "not reproduced"
        )  # fmt: skip
        out.append(
            (
                claim3,
                ", ".join(f"{study.label(n)} {100 * means[n]:.2f}%" for n in ranked)
                + f" (mean best test); BN-x30 − {study.label(nxt)} {_fmt_pt(d)}",
                verdict,
            )
        )

    t = study.target("paper")
    x5, x30 = study.of("paper", "bn-x5"), study.of("paper", "bn-x30")
    seeds = [s for s in x5 if s in x30]
    claim4 = "4. BN-x30 starts slower than BN-x5 (more steps to T − 1 point, validation)"
    if t is None or not seeds:
        out.append((claim4, "—", "pending"))
    else:
        low = t - 0.01
        a = [reach(x5[s], VAL, low) for s in seeds]
        b = [reach(x30[s], VAL, low) for s in seeds]
        k = sum(y is not None and (z is None or z > y) for y, z in zip(a, b, strict=True))
        out.append(
            (
                claim4,
                f"steps to {100 * low:.2f}%: BN-x5 {_fmt_steps(a)}, BN-x30 {_fmt_steps(b)} "
                f"(seeds {seeds})",
                _count(k, len(seeds)),
            )
        )

    base = study.of("tuned", "baseline")
    controls = {n: list(study.of("control", n).values()) for n in
                ("bn-x5-sigmoid", "baseline-sigmoid", "baseline-x5")}  # fmt: skip
    if base and t is not None and all(controls.values()):
        base_best = statistics.fmean(best(r, TEST) for r in base.values())
        for claim, measured, verdict in control_verdicts(
            controls, base_best, lambda r: reach(r, VAL, t), rules
        ):
            out.append((f"5. {claim}", measured, verdict))
    else:
        out.append(("5. the controls (BN-x5-Sigmoid, Baseline-Sigmoid, Baseline-x5)", "—",
                    "pending"))  # fmt: skip

    out.append(_budget_verdict(study))
    return out


def budgets(study: Study) -> list[tuple[int, str]]:
    """(steps, role) of every budget, the study's own (role ``paper``) among them."""
    steps = {int(r.split(":")[1]): r for r in study.roles if r.startswith("budget:")}
    main = next(iter(study.of("tuned", "baseline").values()), None)
    if main is not None:
        steps[main.steps] = "paper"
    return sorted(steps.items())


def _budget_verdict(study: Study) -> tuple[str, str, str]:
    claim = "6. BN-x5's factor grows with the budget"
    found = []
    for steps, role in budgets(study):
        t = study.target(role)
        f = factor(study, role, "bn-x5", VAL, t) if t is not None else None
        done = f is not None and study.done(role) and study.done(study.reference(role))
        found.append((steps, statistics.fmean(f.factors) if f and f.factors else None, f, done))
    measured = "; ".join(
        f"{steps:,} steps: {_fmt_factor(f, study.rules['bootstrap'])}"
        for steps, _, f, _ in found
        if f is not None
    )
    if not all(done for *_, done in found) or len(found) < 2:
        return claim, measured or "—", "pending"
    if any(v is None for _, v, _, _ in found):
        return claim, measured, "not reproduced (the factor is undefined at a budget)"
    values = [v for _, v, _, _ in found]
    if all(a < b for a, b in itertools.pairwise(values)):
        return claim, measured, "reproduced"
    if values[-1] > values[0]:
        return claim, measured, "partly (larger at the longest budget than at the shortest only)"
    return claim, measured, "not reproduced"


# -- tables ---------------------------------------------------------------------------------------


def _winners(study: Study) -> tuple[dict[str, ConvRun], str]:
    last, metric = study.doc["protocol"]["last"], study.doc["protocol"]["metric"]
    recorded = study.doc.get("winners", {})
    winners, notes = {}, []
    for family, names in study.doc["protocol"]["grid"].items():
        grid = study.grid(family)
        done = sum(r.complete for r in grid)
        if done < len(names):
            raise ReportError(
                f"{study.folder}: the selection grid has not finished ({done} of {len(names)} "
                f"{family} runs); run the same command again to continue the study"
            )
        winners[family] = runfiles.select(grid, metric[family], last)
        if recorded.get(family) != winners[family].path.name:
            notes.append(
                f"**{family}: the recomputed winner {winners[family].path.name} differs from "
                f"study.json's {recorded.get(family)}**"
            )
    check = " ".join(notes) or "Recomputed from the grid's files: the same winners as `study.json`."
    return winners, check


def _grid_table(study: Study, family: str, winner: ConvRun) -> str:
    last, metric = study.doc["protocol"]["last"], study.doc["protocol"]["metric"][family]
    grid = study.grid(family)
    lrs = sorted({r.config["lr"] for r in grid})
    hls = sorted({r.config["lr_half_life"] for r in grid})
    rows = [
        "| lr \\ half-life | " + " | ".join(f"{h:g}" for h in hls) + " |",
        "|---|" + "---|" * len(hls),
    ]
    for lr in lrs:
        cells = []
        for hl in hls:
            r = next(r for r in grid if (r.config["lr"], r.config["lr_half_life"]) == (lr, hl))
            s = runfiles.score(r, metric, last)
            text = (
                f"diverged at step {r.diverged[0]:,}" if r.diverged
                else "—" if not math.isfinite(s) else f"{100 * s:.2f}%"
            )  # fmt: skip
            cells.append(f"**{text}**" if r is winner else text)
        rows.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _recipe(run: ConvRun) -> str:
    rec = run.config["recipe"]
    return f"lr {rec['lr']:g}, half-life {rec['lr_half_life']:g}"


def _main_rows(study: Study) -> list[tuple[str, str]]:
    """(role, network) of the study's main table, in order."""
    return [("tuned", "baseline"), ("tuned", "bn-accelerated")] + [("paper", n) for n in PAPER_NETS]


def _main_table(study: Study) -> str:
    rules, t = study.rules, study.target("paper")
    targets = rules["targets"]
    head = (
        "| network | recipe | seeds | best test | final test | best − Baseline (paired) | "
        "steps to T (validation) | factor to T | "
        + " | ".join(f"factor to {100 * x:.0f}% (test)" for x in targets)
        + " |"
    )
    rows = [head, "|---" * (8 + len(targets)) + "|"]
    for role, net in _main_rows(study):
        runs = study.of(role, net)
        if not runs:
            rows.append(f"| {study.label(net)} | — | — |" + " — |" * (5 + len(targets)))
            continue
        first = next(iter(runs.values()))
        final = mean_interval([r.final for r in runs.values()])
        diff = (
            "" if net == "baseline" else _fmt_pt(paired_best(study, role, net, "tuned", "baseline"))
        )
        f = factor(study, role, net, VAL, t) if t is not None else None
        fixed = [
            "—"
            if net == "baseline"
            else _fmt_factor(factor(study, role, net, TEST, x), rules["bootstrap"])
            for x in targets
        ]
        rows.append(
            f"| {study.label(net)} | {_recipe(first)} | {', '.join(map(str, runs))} | "
            f"{_acc(runs)} | {100 * final.value:.2f}% | {diff or '—'} | "
            f"{_fmt_steps(f.own) if f else '—'} | "
            f"{'—' if net == 'baseline' or f is None else _fmt_factor(f, rules['bootstrap'])} | "
            + " | ".join(fixed)
            + " |"
        )
    return "\n".join(rows)


def _fixed_steps_table(study: Study) -> str:
    targets = study.rules["targets"]
    rows = [
        "| network | " + " | ".join(f"steps to {100 * x:.0f}% (test)" for x in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for role, net in _main_rows(study):
        runs = study.of(role, net)
        if runs:
            cells = [_fmt_steps([reach(r, TEST, x) for r in runs.values()]) for x in targets]
            rows.append(f"| {study.label(net)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def decay_roles(study: Study) -> list[tuple[float, str]]:
    """(speed-up, role) of the decay study, the paper's 6× (role ``paper``) among them."""
    found = [(float(r.split(":")[1]), r) for r in study.roles if r.startswith("decay:")]
    return sorted([*found, (6.0, "paper")])


def _decay_table(study: Study) -> str:
    rules, t = study.rules, study.target("paper")
    rows = [
        "| network | decay speed-up | half-life | seeds | best test | steps to T | factor to T | "
        "factor to 90% (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for net in ("bn-x5", "bn-x30"):
        for speed, role in decay_roles(study):
            runs = study.of(role, net)
            if not runs or t is None:
                continue
            f = factor(study, role, net, VAL, t)
            f90 = factor(study, role, net, TEST, 0.90)
            hl = next(iter(runs.values())).config["recipe"]["lr_half_life"]
            paper = " (the paper's)" if role == "paper" else ""
            rows.append(
                f"| {study.label(net)} | {speed:g}×{paper} | {hl:g} | {', '.join(map(str, runs))} | "
                f"{_acc(runs)} | {_fmt_steps(f.own)} | {_fmt_factor(f, rules['bootstrap'])} | "
                f"{_fmt_factor(f90, rules['bootstrap'])} |"
            )
    return "\n".join(rows)


def _budget_table(study: Study) -> str:
    rules = study.rules
    rows = [
        "| budget (steps) | T (Baseline's best, validation) | Baseline best test | BN-x5 best test | "
        "steps to T: Baseline / BN-x5 | factor to T | factor to 90% (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps, role in budgets(study):
        t = study.target(role)
        base, x5 = study.of(study.reference(role), "baseline"), study.of(role, "bn-x5")
        if t is None or not x5:
            rows.append(f"| {steps:,} | — | — | — | — | — | — |")
            continue
        f = factor(study, role, "bn-x5", VAL, t)
        f90 = factor(study, role, "bn-x5", TEST, 0.90)
        rows.append(
            f"| {steps:,} | {100 * t:.2f}% | {_acc(base)} | {_acc(x5)} | "
            f"{_fmt_steps(f.base)} / {_fmt_steps(f.own)} | {_fmt_factor(f, rules['bootstrap'])} | "
            f"{_fmt_factor(f90, rules['bootstrap'])} |"
        )
    return "\n".join(rows)


def largest_factor(study: Study) -> tuple[str, Interval] | None:
    """The largest mean factor to T of any BN network in any condition, with its interval and
    the number of seeds it rests on."""
    found = []
    for role in study.roles:
        t = study.target(role)
        nets = {r.net for r in (study.runs.get(n) for n in study.roles[role]) if r}
        for net in sorted(n for n in nets if n.startswith("bn")):
            iv = factor(study, role, net, VAL, t).interval(study.rules["bootstrap"]) if t else None
            if iv is not None:
                found.append((f"{study.label(net)} (role {role}, {iv.n} seed(s))", iv))
    return max(found, key=lambda x: x[1].value, default=None)


# -- figures --------------------------------------------------------------------------------------


def _style(network: str) -> dict:
    return dict(color=TUNED_COLOR, lw=1.6) if network == "bn-accelerated" else STYLE[network]


def plot_figure2(study: Study, stem: Path) -> list[Path]:
    """(a) test accuracy of the main networks and the controls, 0.4–0.95; (b) validation
    accuracy near T, log steps, with T dotted. Mean over seeds, band min–max."""
    fig, (ax_a, ax_b) = figure(13.0, 4.8, 2)
    t = study.target("paper")
    rows = _main_rows(study) + [
        ("control", n) for n in ("bn-x5-sigmoid", "baseline-x5", "baseline-sigmoid")
    ]
    steps, first = 1, math.inf
    for role, net in rows:
        runs = list(study.of(role, net).values())
        if not runs:
            continue
        steps = max(steps, runs[0].steps)
        first = min(first, min((s for s in runs[0].series(VAL)[0] if s > 0), default=first))
        label = f"{study.label(net)} ({_recipe(runs[0])}; n={len(runs)})"
        band(ax_a, [r.series(TEST) for r in runs], label, alpha=0.15, **_style(net))
        if role != "control":
            band(ax_b, [r.series(VAL) for r in runs], label, alpha=0.15, **_style(net))
    ax_a.set_ylim(0.4, 0.95)
    ax_a.set_title(
        "(a) test accuracy\n(seeds' mean, band min–max; a control at chance lies below 0.4)",
        fontsize=10,
    )
    ax_a.set_ylabel("accuracy (BN: moving-average statistics)")
    ax_b.set_xscale("log")
    if not math.isfinite(first):  # no evaluation run has finished yet
        first = 1
    ax_b.set_xlim(first, steps)
    if t is not None:
        ax_b.axhline(t, color="k", lw=0.8, ls=":")
        ax_b.annotate("T: the tuned Baseline's best", (first, t), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)  # fmt: skip
        ax_b.set_ylim(t - 0.06, t + 0.03)
    ax_b.set_title("(b) validation accuracy near T (log steps)", fontsize=10)
    for ax in (ax_a, ax_b):
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    ax_b.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    shown = set(ax_b.get_legend_handles_labels()[1])
    handles, labels = ax_a.get_legend_handles_labels()
    controls = [(h, n) for h, n in zip(handles, labels, strict=True) if n not in shown]
    if controls:  # drawn in (a) only
        ax_a.legend([h for h, _ in controls], [n for _, n in controls], loc="lower right",
                    fontsize=8)  # fmt: skip
    return save_figure(fig, stem)


def plot_factors(study: Study, stem: Path) -> list[Path]:
    """Factor to T with bootstrap intervals: (a) against the decay speed-up, (b) against the
    budget; the paper's factors as lines."""
    from matplotlib.ticker import NullFormatter

    fig, (ax_a, ax_b) = figure(11.0, 4.8, 2)
    resamples = study.rules["bootstrap"]

    def draw(ax, points, net, offset):
        xs, ys, lo, hi, never = [], [], [], [], []
        for x, role in points:
            t = study.target(role)
            iv = factor(study, role, net, VAL, t).interval(resamples) if t else None
            if iv is None:
                if t and study.of(role, net):  # it ran, and no seed reached T
                    never.append(x * offset)
                continue
            xs.append(x * offset)
            ys.append(iv.value)
            lo.append(iv.value - (iv.low if iv.low is not None else iv.value))
            hi.append((iv.high if iv.high is not None else iv.value) - iv.value)
        if xs:
            color = STYLE[net]["color"]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3,
                        label=f"{study.label(net)}")  # fmt: skip
            ax.axhline(PAPER_FACTOR[net], color=color, ls=":", lw=1,
                       label=f"the paper's {study.label(net)}: {PAPER_FACTOR[net]:.1f}×")  # fmt: skip
        if never:
            ax.scatter(never, [0.6] * len(never), marker="v", color=STYLE[net]["color"],
                       label=f"{study.label(net)}: no seed reaches T")  # fmt: skip

    for net, offset in (("bn-x5", 0.98), ("bn-x30", 1.02)):
        draw(ax_a, decay_roles(study), net, offset)
    draw(ax_b, budgets(study), "bn-x5", 1.0)
    ax_a.set_xscale("log")
    ax_a.set_xticks([1, 1.5, 2, 3, 6], ["1", "1.5", "2", "3", "6 (paper)"])
    ax_a.set_xlabel("learning-rate decay speed-up over the Baseline's")
    ax_a.set_title("(a) decay (the study's budget)", fontsize=10)
    ax_b.set_xscale("log")
    ticks = [s for s, _ in budgets(study)]
    ax_b.set_xticks(ticks, [f"{s:,}" for s in ticks])
    ax_b.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax_b.set_xlabel("budget (steps; half-lives scaled with it)")
    ax_b.set_title("(b) budget", fontsize=10)
    for ax in (ax_a, ax_b):
        ax.set_yscale("log")
        ax.set_yticks([0.5, 1, 2, 5, 10, 20], ["0.5", "1", "2", "5", "10", "20"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("factor to T (Baseline's steps ÷ own; bootstrap 95%)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # an unfinished study may have nothing here yet
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    return save_figure(fig, stem)


# -- the report -----------------------------------------------------------------------------------


def _compute(study: Study) -> str:
    runs = list(study.runs.values())
    core_s = sum(r.train_s + r.eval_s for r in runs if math.isfinite(r.train_s))
    clocks = [x["clock_s"] for r in runs for x in r.records if x.get("clock_s")]
    span = (max(clocks) - min(clocks)) / 3600 if clocks else math.nan
    return (
        f"{len(runs)} runs, {core_s / 3600:.1f} core-hours of training and evaluation; "
        f"{span:.1f} h of wall clock from the first record to the last (runs in parallel, "
        "interruptions included)"
    )


def write_study_report(folder: str | Path, runs: Sequence[runfiles.RunFiles]) -> Path:
    """``report.md`` and the study figures of a pre-registered convnet study folder."""
    folder = Path(folder)
    study = Study(
        folder, runfiles.read_study(folder), {r.path.name: ConvRun(**vars(r)) for r in runs}
    )
    winners, check = _winners(study)
    missing = study.missing()
    status = (
        f"**Unfinished: {len(missing)} run(s) of the study have not finished** "
        f"({', '.join(missing[:8])}{', …' if len(missing) > 8 else ''}). The numbers and verdicts "
        "below are of the finished runs only and are not the study's result; run the same "
        "command again to continue it."
        if missing
        else "Every run of the study has finished."
    )
    plot_figure2(study, folder / "study_figure2")
    plot_factors(study, folder / "study_factors")
    table = ["| claim (Sec. 4.2, Figures 2–3) | measured | verdict |", "|---|---|---|"]
    table += [f"| {c} | {m} | **{v}** |" for c, m, v in verdicts(study)]
    top = largest_factor(study)
    proto = study.doc["protocol"]
    first = winners["baseline"]
    env = first.env.get("sessions", [{}])[0]
    t = study.target("paper")
    text = template("convnet_protocol.md").substitute(
        name=proto["name"],
        folder=folder,
        registered=study.doc.get("registered", "unknown"),
        preset=study.doc.get("preset") or "none (the full study)",
        status=status,
        protocol=proto["text"].strip(),
        rules=", ".join(f"`{k}` = {v}" for k, v in proto["rules"].items()),
        check=check,
        baseline_winner=_recipe(winners["baseline"]),
        bn_winner=_recipe(winners["bn"]),
        baseline_grid=_grid_table(study, "baseline", winners["baseline"]),
        bn_grid=_grid_table(study, "bn", winners["bn"]),
        target="—" if t is None else f"{100 * t:.2f}%",
        main=_main_table(study),
        fixed=_fixed_steps_table(study),
        decay=_decay_table(study),
        budget=_budget_table(study),
        largest="—" if top is None else f"{top[0]}: {_fmt_iv(top[1])}",
        verdicts="\n".join(table),
        compute=_compute(study),
        torch=first.versions.get("torch", "?"),
        batchnorm=first.versions.get("batchnorm", "?"),
        cpu=env.get("cpu", "?"),
        git=env.get("git_revision", "?"),
    )
    path = folder / "report.md"
    write_text(path, text)
    return path
