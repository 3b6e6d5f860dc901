"""The report of the pre-registered mechanism study (``batchnorm reproduce mechanism``), from the
study folder's files alone: ``study.json`` (the protocol as registered: text, rules, the runs of
each network and arm) and each run's ``metrics.jsonl`` and ``shift.json``.

It applies the registered rules (``experiments/mechanism/protocol.py``) per network and noise
strength, and writes ``report.md`` and ``mechanism.png/svg``. An unfinished study is reported on
its finished runs and marked as such.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import runfiles
from .._atomic import write_text
from .common import ReportError, band, first_step, save_figure, template
from .stats import mean_interval

__all__ = [
    "Arm",
    "Cell",
    "arm_of",
    "cells",
    "chosen_lr",
    "equivalent",
    "group",
    "largest_gaps",
    "later_verdicts",
    "norm_gap",
    "part2_verdicts",
    "scale_verdicts",
    "stable_range",
    "verdicts",
    "write_report",
]

ARMS = ("plain", "bn", "noisy-weak", "noisy-strong")
COLOR = {"plain": "#444444", "bn": "#1f77b4", "noisy-weak": "#ff7f0e", "noisy-strong": "#d62728"}


def _finished(run: runfiles.RunFiles) -> bool:
    """Trained to the end, or stopped as diverged."""
    last = run.records[-1] if run.records else {}
    return bool(last) and (last["step"] == run.config["steps"] or bool(last.get("diverged")))


def _diverged(run: runfiles.RunFiles) -> bool:
    return bool(run.records[-1].get("diverged"))


@dataclass(frozen=True)
class Arm:
    """One arm of one network: its finished runs by seed, and the measures of each."""

    runs: dict[int, runfiles.RunFiles]
    resolution: int  # steps between evaluations from which the measures start

    def steps_to(self, target: float) -> dict[int, int | None]:
        return {s: first_step(*r.series("val_acc"), target) for s, r in self.runs.items()}

    def steps_or_budget(self, target: float) -> dict[int, int]:
        """Steps to ``target``, a run that never reaches it counting as its budget."""
        return {
            s: r.config["steps"] if v is None else v
            for (s, v), r in zip(self.steps_to(target).items(), self.runs.values(), strict=True)
        }

    def _readings(self, run: runfiles.RunFiles, key: str) -> list[float]:
        """The run's finite readings of ``key`` from the resolution step on (a reading of several
        layers is their mean; NaN where the gradient vanished)."""
        out = []
        for r in run.records:
            v = r.get(key)
            if v is not None and r["step"] >= self.resolution:
                v = statistics.fmean(v) if isinstance(v, list) else v
                if math.isfinite(v):
                    out.append(v)
        return out

    def _per_seed(self, key: str, summary) -> dict[int, float]:
        return {
            s: summary(v) if (v := self._readings(r, key)) else math.nan
            for s, r in self.runs.items()
        }

    def ics(self) -> dict[int, float]:
        """Relative ICS, mean over the layers after the first and the readings."""
        return self._per_seed("ics_rel", statistics.fmean)

    def cos(self) -> dict[int, float]:
        return self._per_seed("ics_cos", statistics.fmean)

    def beta(self) -> dict[int, float]:
        return self._per_seed("beta", statistics.median)

    def drift(self) -> dict[int, float]:
        """Per 1,000 steps in std units from the first evaluation after step 0, mean over the
        hidden sigmoid inputs (``shift.json``)."""
        out = {}
        for s, r in self.runs.items():
            layers = r.extra.get("shift", {}).get("layers")
            if not layers:
                raise ReportError(f"{r.path}: no shift.json (the run writes it when it ends)")
            out[s] = statistics.fmean(v["std_trained"]["per_interval"] for v in layers.values())
        return out

    def final_test(self) -> dict[int, float]:
        return {s: r.series("test_acc")[1][-1] for s, r in self.runs.items()}


def group(doc: dict, runs: dict[str, runfiles.RunFiles], family: str) -> Arm:
    """The finished runs of one family of the study (``fig1:bn``, ``depth:10:bn:0.5``, …)."""
    names = doc["protocol"]["grid"].get(family, [])
    found = {runs[n].config["seed"]: runs[n] for n in names if n in runs and _finished(runs[n])}
    return Arm(dict(sorted(found.items())), doc["protocol"]["rules"]["resolution"])


def arm_of(doc: dict, runs: dict[str, runfiles.RunFiles], net: str, arm: str) -> Arm:
    return group(doc, runs, f"{net}:{arm}")


def nets_of(doc: dict) -> list[str]:
    """The networks of part 1 (its families are ``<net>:<arm>``; the later parts' have more
    fields: ``lr:<arm>:<lr>``, ``depth:<d>:<arm>:<lr>``, ``dropout:…``, ``batch:…``)."""
    return list(
        dict.fromkeys(f.split(":")[0] for f in doc["protocol"]["grid"] if f.count(":") == 1)
    )


# -- part 2: learning rates and scale -------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (network, lr) cell of part 2: its finished runs by seed."""

    lr: float
    runs: dict[int, runfiles.RunFiles]

    @property
    def diverged(self) -> int:
        return sum(_diverged(r) for r in self.runs.values())

    @property
    def final(self) -> float:
        """Mean final validation accuracy (NaN if a seed diverged)."""
        if self.diverged or not self.runs:
            return math.nan
        return statistics.fmean(r.series("val_acc")[1][-1] for r in self.runs.values())


def cells(doc: dict, runs: dict[str, runfiles.RunFiles], arm: str) -> list[Cell]:
    out = []
    for lr in doc["protocol"]["rules"]["lr_grid"]:
        names = doc["protocol"]["grid"].get(f"lr:{arm}:{lr:g}", [])
        found = {runs[n].config["seed"]: runs[n] for n in names if n in runs and _finished(runs[n])}
        out.append(Cell(lr, dict(sorted(found.items()))))
    return out


def stable_range(doc: dict, row: list[Cell]) -> tuple[float, float] | None:
    """(lowest, largest) stable lr of the run of consecutive stable cells that holds the best."""
    finals = [c.final for c in row]
    if not any(math.isfinite(f) for f in finals):
        return None
    best = max(f for f in finals if math.isfinite(f))
    ok = [
        math.isfinite(f) and f >= best - doc["protocol"]["rules"]["stable_within"] for f in finals
    ]
    i = finals.index(best)
    lo = hi = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi + 1 < len(row) and ok[hi + 1]:
        hi += 1
    return row[lo].lr, row[hi].lr


def _lr_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    grid = doc["protocol"]["rules"]["lr_grid"]
    rows = ["| network | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | stable range |",
            "|---" * (2 + len(grid)) + "|"]  # fmt: skip
    for arm in ("plain", "bn"):
        row = cells(doc, runs, arm)
        text = []
        for c in row:
            if not c.runs:
                text.append("—")
            elif c.diverged:
                text.append(f"diverged ({c.diverged} of {len(c.runs)})")
            else:
                text.append(f"{100 * c.final:.2f}%")
        rng = stable_range(doc, row)
        span = "—" if rng is None else f"{rng[0]:g} – {rng[1]:g}"
        rows.append(f"| {arm} | " + " | ".join(text) + f" | {span} |")
    return "\n".join(rows)


def _scale_errors(row: list[Cell], a: str) -> dict[str, float]:
    """The largest step-0 scale-check errors at factor ``a`` of an arm's runs."""
    out = {}
    for key in ("weight_grad_error", "input_grad_error"):
        vals = [r.records[0][f"scale_{key}"][a] for c in row for r in c.runs.values()
                if f"scale_{key}" in r.records[0]]  # fmt: skip
        out[key] = max(vals) if vals else math.nan
    return out


def _norm_growth(cell: Cell) -> str:
    """Final ÷ initial norm of each hidden weight matrix, mean over seeds."""
    if not cell.runs or cell.diverged:
        return "—"
    ratios = []
    for r in cell.runs.values():
        first, last = r.records[0]["w_norm"], r.records[-1]["w_norm"]
        ratios.append([b / a for a, b in zip(first, last, strict=True)])
    return ", ".join(f"{statistics.fmean(col):.1f}×" for col in zip(*ratios, strict=True))


def part2_verdicts(doc: dict, runs: dict[str, runfiles.RunFiles]) -> list[tuple[str, str, str]]:
    rules = doc["protocol"]["rules"]
    rows = {arm: cells(doc, runs, arm) for arm in ("plain", "bn")}
    n = len(rules["seeds"])
    if any(len(c.runs) < n for row in rows.values() for c in row):
        return [("part 2", "not every run has finished", "pending")]
    err = {(arm, a): _scale_errors(row, a) for arm, row in rows.items() for a in ("10", "0.1")}

    def fmt(e: dict[str, float]) -> str:
        return f"{e['weight_grad_error']:.1e} / {e['input_grad_error']:.1e}"

    worst = max(err["bn", "10"].values())
    out = [
        (
            "6. With BN, a · ∂L/∂(aW) = ∂L/∂W and the gradient to the layer below is unchanged "
            "(Sec. 3.3; judged at a = 10)",
            f"largest relative error (weight gradient / input gradient) with BN at a = 10 "
            f"{fmt(err['bn', '10'])}, at a = 0.1 {fmt(err['bn', '0.1'])} (ε counts); without BN "
            f"at a = 10 {fmt(err['plain', '10'])}",
            "holds" if worst < rules["scale_exact"] else "does not hold",
        )
    ]
    ranges = {arm: stable_range(doc, row) for arm, row in rows.items()}
    if ranges["bn"] is None:
        verdict = "not reproduced (BN has no stable cell)"
    elif ranges["plain"] is None:
        verdict = "reproduced (without BN no learning rate is stable)"
    else:
        ratio = ranges["bn"][1] / ranges["plain"][1]
        verdict = (
            "reproduced"
            if ratio >= rules["higher_factor"]
            else f"partly ({ratio:g}×, less than {rules['higher_factor']:g}×)"
            if ratio > 1
            else "not reproduced"
        )
    measured = "; ".join(
        f"{arm}: stable {'none' if r is None else f'{r[0]:g} – {r[1]:g}'}"
        for arm, r in ranges.items()
    )
    out.append(("7. BN allows much higher learning rates (largest stable lr ≥ 5× plain's)",
                measured, verdict))  # fmt: skip
    return out


def _norm_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    rows = ["| network | lr | hidden weight norms, end ÷ step 0 (per layer, mean over seeds) |",
            "|---|---|---|"]  # fmt: skip
    for arm in ("plain", "bn"):
        row = cells(doc, runs, arm)
        rng = stable_range(doc, row)
        lrs = dict.fromkeys([1.0] + ([rng[1]] if rng else []))
        for cell in (c for c in row if c.lr in lrs):
            rows.append(f"| {arm} | {cell.lr:g} | {_norm_growth(cell)} |")
    return "\n".join(rows)


# -- verdicts -------------------------------------------------------------------------------------


def _count(k: int, n: int, yes: str = "yes", no: str = "no") -> str:
    if n and k == n:
        return yes
    return f"partly: {k} of {n}" if k else f"{no} (0 of {n})"


def _below(a: dict[int, float], b: dict[int, float]) -> tuple[int, int]:
    """Seeds where a < b, of the seeds both have."""
    seeds = [s for s in a if s in b]
    return sum(a[s] < b[s] for s in seeds), len(seeds)


def _fmt(d: dict, digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else f"{v:,}" for v in d.values())


def _ics_and_beta(arms: dict[str, Arm], rules: dict, net: str) -> list[tuple[str, str, str]]:
    """Verdicts 3 and 4 (they need no target)."""
    ics = {a: arms[a].ics() for a in ("plain", "bn")}
    beta = {a: arms[a].beta() for a in ("plain", "bn")}
    stuck = ""
    if None in arms["plain"].steps_to(rules["fallback_target"]).values():
        top = max(max(r.series("val_acc")[1]) for r in arms["plain"].runs.values())
        stuck = (
            f" (plain never reaches {100 * rules['fallback_target']:.0f}%, best validation "
            f"accuracy {100 * top:.1f}%: these are the numbers of a network that barely learns)"
        )
    return [
        (
            f"{net}: BN reduces Santurkar's ICS (relative ‖G − G′‖ / ‖G‖)",
            f"plain {_fmt(ics['plain'])}, BN {_fmt(ics['bn'])}{stuck}",
            _count(*_below(ics["bn"], ics["plain"])),
        ),
        (
            f"{net}: BN makes the loss smoother along the step (effective β)",
            f"plain {_fmt(beta['plain'])}, BN {_fmt(beta['bn'])}{stuck}",
            _count(*_below(beta["bn"], beta["plain"])),
        ),
    ]


def verdicts(doc: dict, runs: dict[str, runfiles.RunFiles], net: str) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) of the registered rules for one network."""
    rules = doc["protocol"]["rules"]
    arms = {a: arm_of(doc, runs, net, a) for a in ARMS}
    res, n = rules["resolution"], len(rules["seeds"])
    if any(len(arms[a].runs) < n for a in ("plain", "bn")):
        return [(f"{net}: all", "plain and BN have not finished every seed", "pending")]
    target = next(
        (t for t in (rules["main_target"], rules["fallback_target"])
         if None not in arms["bn"].steps_to(t).values()),
        None,
    )  # fmt: skip
    if target is None:
        return [
            (f"{net}: 1, 2 and 5", f"BN does not reach {rules['fallback_target']:.0%} in every "
             "seed", "no target"),
            *_ics_and_beta(arms, rules, net),
        ]  # fmt: skip
    steps = {a: arms[a].steps_or_budget(target) for a in ARMS if len(arms[a].runs) == n}
    mean = {a: statistics.fmean(v.values()) for a, v in steps.items()}
    ics = {a: arms[a].ics() for a in steps}
    drift = {a: arms[a].drift() for a in steps}
    gain = mean["plain"] - mean["bn"]
    never = {a: sum(v is None for v in arms[a].steps_to(target).values()) for a in steps}
    pct = f"{100 * target:.0f}%"
    if target != rules["main_target"]:
        pct += f" (BN does not reach {100 * rules['main_target']:.0f}% in every seed)"
    out = []
    k_ics, n_ics = _below(ics["bn"], ics["plain"])
    for arm in ("noisy-weak", "noisy-strong"):
        claim = f"{net}, {arm}: ICS (the paper) or Santurkar?"
        if arm not in steps:
            out.append((claim, "—", "pending"))
            continue
        lost = mean[arm] - mean["bn"]
        lo, hi = min(steps["bn"].values()) - res, max(steps["bn"].values()) + res
        k_drift, n_drift = _below(drift["bn"], drift[arm])
        ics_side = gain > 0 and lost >= rules["lose_half"] * gain and k_ics == n_ics
        santurkar = lo <= mean[arm] <= hi and k_drift == n_drift
        if ics_side and santurkar:
            verdict = "undecided: BN's gain is within its seed spread"
        elif ics_side:
            verdict = "supports the ICS explanation"
        elif santurkar:
            verdict = "supports Santurkar"
        else:
            verdict = "neither"
        measured = (
            f"steps to {pct} (mean; never = budget): plain {mean['plain']:,.0f}, BN "
            f"{mean['bn']:,.0f} (seeds {_fmt(steps['bn'])}), {arm} {mean[arm]:,.0f}; noisy BN "
            f"loses {lost:,.0f} of BN's gain of {gain:,.0f} steps; drift per 1k steps BN "
            f"{_fmt(drift['bn'])}, {arm} {_fmt(drift[arm])} (more in {k_drift} of {n_drift}); "
            f"ICS BN < plain in {k_ics} of {n_ics}"
        )
        if never["plain"] or never[arm]:
            measured += (
                f"; never reached, counted as the budget: plain in {never['plain']} of {n}, "
                f"{arm} in {never[arm]} of {n}"
            )
        out.append((claim, measured, verdict))
    out += _ics_and_beta(arms, rules, net)
    note = f" (never in {never['plain']} of {n}: counted as the budget)" if never["plain"] else ""
    out.append(
        (
            f"{net}: BN reaches {pct} validation accuracy sooner",
            f"plain {_fmt(steps['plain'])}{note}, BN {_fmt(steps['bn'])}",
            _count(*_below(steps["bn"], steps["plain"])),
        )
    )
    return out


# -- tables and figure ----------------------------------------------------------------------------


def _table(doc: dict, runs: dict[str, runfiles.RunFiles], net: str) -> str:
    targets = doc["protocol"]["rules"]["targets"]
    rows = [
        "| arm | seeds | "
        + " | ".join(f"steps to {100 * t:.0f}% (val)" for t in targets)
        + " | final test | ICS ‖G−G′‖/‖G‖ | cos(G, G′) | effective β | drift / 1k steps |",
        "|---" * (7 + len(targets)) + "|",
    ]

    def fmt_steps(d: dict) -> str:
        return ", ".join("never" if v is None else f"{v:,}" for v in d.values())

    for a in ARMS:
        arm = arm_of(doc, runs, net, a)
        if not arm.runs:
            rows.append(f"| {a} | — |" + " — |" * (5 + len(targets)))
            continue
        acc = mean_interval(list(arm.final_test().values()))
        acc_text = f"{acc.value:.4f}" + (
            f" [{acc.low:.4f}, {acc.high:.4f}]" if acc.low is not None else ""
        )
        cells = [fmt_steps(arm.steps_to(t)) for t in targets]
        rows.append(
            f"| {a} | {', '.join(map(str, arm.runs))} | " + " | ".join(cells)
            + f" | {acc_text} | {_fmt(arm.ics())} | {_fmt(arm.cos(), 4)} | {_fmt(arm.beta())} | "
            f"{_fmt(arm.drift())} |"
        )  # fmt: skip
    return "\n".join(rows)


def _curve(run: runfiles.RunFiles, key) -> tuple[list[int], list[float]]:
    pts = [(x["step"], key(x)) for x in run.records if key(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(doc: dict, runs: dict[str, runfiles.RunFiles], stem: Path) -> list[Path]:
    """Per network (rows): validation accuracy, relative ICS and effective β over training."""
    from matplotlib.figure import Figure

    nets = nets_of(doc)
    fig = Figure(figsize=(14.0, 3.6 * len(nets)), layout="constrained")
    axes = fig.subplots(len(nets), 3, squeeze=False)
    keys = (
        ("validation accuracy", lambda x: x.get("val_acc"), "linear"),
        ("ICS: ‖G − G′‖ / ‖G‖, mean over the layers after the first",
         lambda x: statistics.fmean(x["ics_rel"]) if x.get("ics_rel") else None, "log"),
        ("effective β along the step", lambda x: x.get("beta"), "log"),
    )  # fmt: skip
    for row, net in zip(axes, nets, strict=True):
        for ax, (title, key, scale) in zip(row, keys, strict=True):
            for a in ARMS:
                arm = arm_of(doc, runs, net, a)
                if arm.runs:
                    curves = [_curve(r, key) for r in arm.runs.values()]
                    band(ax, curves, f"{a} (n={len(arm.runs)})", color=COLOR[a])
            ax.set_yscale(scale)
            ax.set_title(f"{net}: {title}", fontsize=10)
            ax.set_xlabel("training steps")
            ax.grid(alpha=0.3)
        row[0].set_ylim(0.5, 1.0)
        row[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return save_figure(fig, stem)


def plot_lr(doc: dict, runs: dict[str, runfiles.RunFiles], stem: Path) -> list[Path]:
    """Part 2: final validation accuracy against the learning rate (mean, min–max over seeds),
    the stable range shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for arm, color in (("plain", COLOR["plain"]), ("bn", COLOR["bn"])):
        row = cells(doc, runs, arm)
        finals = [
            [math.nan if _diverged(r) else r.series("val_acc")[1][-1] for r in c.runs.values()]
            or [math.nan]
            for c in row
        ]  # a diverged or missing cell is a gap in the line
        lrs = [c.lr for c in row]
        ax.plot(lrs, [statistics.fmean(v) for v in finals], "o-", color=color, label=arm)
        ax.fill_between(lrs, [min(v) for v in finals], [max(v) for v in finals], color=color,
                        alpha=0.2, lw=0)  # fmt: skip
        rng = stable_range(doc, row)
        if rng:
            ax.axvspan(rng[0], rng[1], color=color, alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD)")
    ax.set_ylabel("final validation accuracy")
    ax.set_title("fig1 network, 10,000 steps: shaded, each network's stable range", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, stem)


# -- parts 3-5: depth, Dropout, the size of the batches BN's statistics come from --------------


def _final(arm: Arm, key: str = "test_acc") -> dict[int, float]:
    """The last evaluation's ``key`` per seed (NaN for a diverged seed)."""
    return {s: math.nan if _diverged(r) else r.series(key)[1][-1] for s, r in arm.runs.items()}


def _gap(arm: Arm) -> dict[int, float]:
    """Final training accuracy (the 10,000 training images) − final test accuracy, per seed."""
    train, test = _final(arm, "train_acc"), _final(arm)
    return {s: train[s] - test[s] for s in test}


def _paired(a: dict[int, float], b: dict[int, float]):
    """a − b over the seeds both have finite, with a t 95% interval (None: no such seed)."""
    d = [a[s] - b[s] for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    return mean_interval(d) if d else None


def _above(i) -> bool:
    return i is not None and i.above


def _below0(i) -> bool:
    return i is not None and i.high is not None and i.high < 0


def _pts(i) -> str:
    return "—" if i is None else i.fmt(100, 2, " pt")


def chosen_lr(doc: dict, runs: dict[str, runfiles.RunFiles], depth: int, arm: str):
    """Part 3: the lr with the highest mean final validation accuracy over the seeds (ties: the
    smaller; a cell with a diverged or missing seed is not chosen), or None."""
    rules, best = doc["protocol"]["rules"], None
    for lr in rules["depth_lrs"]:
        a = group(doc, runs, f"depth:{depth}:{arm}:{lr:g}")
        vals = list(_final(a, "val_acc").values())
        if len(vals) < len(rules["seeds"]) or not all(map(math.isfinite, vals)):
            continue
        if best is None or statistics.fmean(vals) > best[1]:
            best = (lr, statistics.fmean(vals))
    return None if best is None else best[0]


def _chosen(doc, runs, depth: int, arm: str) -> Arm | None:
    lr = chosen_lr(doc, runs, depth, arm)
    return None if lr is None else group(doc, runs, f"depth:{depth}:{arm}:{lr:g}")


def _mean_pct(d: dict[int, float]) -> str:
    vals = [v for v in d.values() if math.isfinite(v)]
    return f"{100 * statistics.fmean(vals):.2f}%" if vals else "—"


def _depth_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    rules = doc["protocol"]["rules"]
    lrs = ", ".join(f"{lr:g}" for lr in rules["depth_lrs"])
    rows = [
        f"| depth | plain: mean final val (lr {lrs}) | BN: mean final val (lr {lrs}) | plain, "
        "chosen lr: final test | BN, chosen lr: final test | BN − plain (test) |",
        "|---|---|---|---|---|---|",
    ]
    for depth in rules["depths"]:
        cells, chosen = [], {}
        for arm in ("plain", "bn"):
            vals = []
            for lr in rules["depth_lrs"]:
                a = group(doc, runs, f"depth:{depth}:{arm}:{lr:g}")
                div = sum(map(_diverged, a.runs.values()))
                vals.append(
                    f"{_mean_pct(_final(a, 'val_acc'))}" + (f" ({div} div.)" if div else "")
                )
            cells.append(", ".join(vals))
            chosen[arm] = (chosen_lr(doc, runs, depth, arm), _chosen(doc, runs, depth, arm))
        tests = [
            "—" if a is None else f"{_mean_pct(_final(a))} (lr {lr:g})" for lr, a in chosen.values()
        ]
        diff = (
            _paired(_final(chosen["bn"][1]), _final(chosen["plain"][1]))
            if chosen["bn"][1] and chosen["plain"][1]
            else None
        )
        rows.append(
            f"| {depth} | {cells[0]} | {cells[1]} | {tests[0]} | {tests[1]} | {_pts(diff)} |"
        )
    return "\n".join(rows)


def _dropout_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    rows = [
        "| network | Dropout p | final test | final train (10,000 images) | train − test gap | "
        "test: p − (p = 0) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ("plain", "bn"):
        none = group(doc, runs, f"dropout:{arm}:0")
        for p in doc["protocol"]["rules"]["dropout"]:
            a = group(doc, runs, f"dropout:{arm}:{p:g}")
            vs = "" if not p else _pts(_paired(_final(a), _final(none)))
            rows.append(
                f"| {arm} | {p:g} | {_mean_pct(_final(a))} | {_mean_pct(_final(a, 'train_acc'))} "
                f"| {_pts(_paired(_final(a, 'train_acc'), _final(a)))} | {vs} |"
            )
    return "\n".join(rows)


def _batch_arms(doc: dict, runs: dict[str, runfiles.RunFiles]) -> list[tuple[str, int, Arm]]:
    rules = doc["protocol"]["rules"]
    out = [("ghost", k, group(doc, runs, f"batch:ghost:{k}")) for k in rules["ghost"]]
    out += [("renorm", k, group(doc, runs, f"batch:renorm:{k}")) for k in rules["renorm_at"]]
    return out


def _batch_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    whole = max(doc["protocol"]["rules"]["ghost"])
    full = _final(group(doc, runs, f"batch:ghost:{whole}"))
    target = doc["protocol"]["rules"]["main_target"]
    rows = [
        f"| statistics from | final test | steps to {100 * target:.0f}% (val) | test − BN over the "
        "whole batch |",
        "|---|---|---|---|",
    ]
    for kind, k, a in _batch_arms(doc, runs):
        name = {"ghost": f"ghost BN, {k} examples", "renorm": f"Batch Renorm, {k} examples"}[kind]
        if kind == "ghost" and k == whole:
            name = f"BN, the whole batch ({k})"
        steps = ", ".join("never" if v is None else f"{v:,}" for v in a.steps_to(target).values())
        vs = "" if name.startswith("BN,") else _pts(_paired(_final(a), full))
        rows.append(f"| {name} | {_mean_pct(_final(a))} | {steps or '—'} | {vs} |")
    return "\n".join(rows)


def later_verdicts(doc: dict, runs: dict[str, runfiles.RunFiles]) -> list[tuple[str, str, str]]:
    """Verdicts 9–13 (parts 3–5), by the registered rules."""
    rules, out = doc["protocol"]["rules"], []
    # 9: depth
    diffs, bn_acc = {}, {}
    for depth in rules["depths"]:
        plain, bn = _chosen(doc, runs, depth, "plain"), _chosen(doc, runs, depth, "bn")
        if plain and bn:
            diffs[depth] = _paired(_final(bn), _final(plain))
        if bn:
            bn_acc[depth] = statistics.fmean(_final(bn).values())
    top, low = max(rules["depths"]), min(rules["depths"])
    measured = "; ".join(f"depth {d}: BN − plain {_pts(i)}" for d, i in diffs.items())
    if top not in diffs or low not in bn_acc or top not in bn_acc:
        verdict = "pending"
    else:
        keeps = bn_acc[top] >= bn_acc[low] - rules["depth_keeps"]
        measured += f"; BN at depth {top} vs {low}: {100 * (bn_acc[top] - bn_acc[low]):+.2f} pt"
        if not _above(diffs[top]):
            verdict = "not reproduced"
        elif all(_above(diffs.get(d)) for d in rules["deep"]) and keeps:
            verdict = "reproduced"
        else:
            verdict = "partly: " + (
                "BN beats plain at the deepest only" if keeps else
                f"BN beats plain but loses more than {100 * rules['depth_keeps']:.0f} points with depth"
            )  # fmt: skip
    out.append(("9. BN lets saturating (sigmoid) networks train at depth", measured, verdict))
    # 10, 11: Dropout
    plain0, bn0 = group(doc, runs, "dropout:plain:0"), group(doc, runs, "dropout:bn:0")
    gap = _paired(_gap(plain0), _gap(bn0))
    verdict = (
        "pending" if gap is None else "yes" if gap.above
        else "no: BN's gap is larger" if _below0(gap) else "not distinguishable"
    )  # fmt: skip
    out.append((
        "10. BN regularizes: a smaller train–test gap than plain (no Dropout)",
        f"plain's gap − BN's: {_pts(gap)}", verdict,
    ))  # fmt: skip
    helps, said = {}, []
    for arm in ("plain", "bn"):
        none = _final(group(doc, runs, f"dropout:{arm}:0"))
        gains = {p: _paired(_final(group(doc, runs, f"dropout:{arm}:{p:g}")), none)
                 for p in rules["dropout"] if p}  # fmt: skip
        helps[arm] = any(_above(i) for i in gains.values())
        said.append(f"{arm}: " + ", ".join(f"p {p:g} {_pts(i)}" for p, i in gains.items()))
    pending = any(i is None for i in [gap])
    verdict = (
        "pending" if pending else "not reproduced" if helps["bn"]
        else "reproduced" if helps["plain"] else "not tested: Dropout helps neither network"
    )  # fmt: skip
    out.append(("11. BN reduces the need for Dropout (test accuracy, p − no Dropout)",
                "; ".join(said), verdict))  # fmt: skip
    # 12, 13: ghost batches and Batch Renorm
    ghost = {k: group(doc, runs, f"batch:ghost:{k}") for k in rules["ghost"]}
    full = _final(ghost[max(rules["ghost"])])
    vs = {k: _paired(_final(a), full) for k, a in ghost.items() if k < max(rules["ghost"])}
    small, large = rules["small"], rules["large"]
    if any(vs.get(k) is None for k in [*small, large]):
        verdict = "pending"
    elif not _below0(vs[small[0]]):
        verdict = "not reproduced"
    elif all(_below0(vs[k]) for k in small) and not _below0(vs[large]):
        verdict = "reproduced"
    else:
        verdict = "partly: " + (
            "worse at 16 too" if _below0(vs[large]) else f"worse at {small[0]} only"
        )
    out.append((
        "12. BN degrades with small batches (ghost batch − the whole batch of 60, test)",
        "; ".join(f"{k}: {_pts(i)}" for k, i in vs.items()), verdict,
    ))  # fmt: skip
    rec = {k: _paired(_final(group(doc, runs, f"batch:renorm:{k}")), _final(ghost[k]))
           for k in rules["renorm_at"]}  # fmt: skip
    n_up = sum(map(_above, rec.values()))
    verdict = (
        "pending"
        if any(i is None for i in rec.values())
        else _count(n_up, len(rec), "reproduced", "not reproduced")
    )
    out.append((
        "13. Batch Renorm recovers part of it (renorm − ghost BN, same ghost batches, test)",
        "; ".join(f"{k}: {_pts(i)}" for k, i in rec.items()), verdict,
    ))  # fmt: skip
    if len(rules["seeds"]) < 2:  # the rules read intervals, and one seed has none
        out = [(c, m, v if v == "pending" else "undecided: one seed, no interval")
               for c, m, v in out]  # fmt: skip
    return out


def plot_later(doc: dict, runs: dict[str, runfiles.RunFiles], stem: Path) -> list[Path]:
    """Parts 3–5: final test accuracy against depth (chosen lr), Dropout and the ghost-batch
    size; each point the mean over seeds, the bar their min–max."""
    from matplotlib.figure import Figure

    rules = doc["protocol"]["rules"]
    fig = Figure(figsize=(14.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)

    def draw(ax, xs, arms, label, color, marker="o"):
        pts = [(x, list(_final(a).values())) for x, a in zip(xs, arms, strict=True) if a and a.runs]
        pts = [(x, [v for v in vals if math.isfinite(v)]) for x, vals in pts]
        pts = [(x, v) for x, v in pts if v]
        if not pts:
            return
        x, v = [p[0] for p in pts], [p[1] for p in pts]
        mean = [statistics.fmean(u) for u in v]
        err = [[m - min(u) for m, u in zip(mean, v, strict=True)],
               [max(u) - m for m, u in zip(mean, v, strict=True)]]  # fmt: skip
        ax.errorbar(x, mean, yerr=err, fmt=marker + "-", color=color, label=label, capsize=3)

    ax = axes[0]
    for arm in ("plain", "bn"):
        draw(ax, rules["depths"], [_chosen(doc, runs, d, arm) for d in rules["depths"]],
             f"{arm} (its best lr on validation)", COLOR[arm])  # fmt: skip
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(rules["depths"], [str(d) for d in rules["depths"]])
    ax.set_xlabel("hidden sigmoid layers (Glorot init)")
    ax.set_title("Part 3: depth", fontsize=10)
    ax = axes[1]
    for arm in ("plain", "bn"):
        draw(ax, rules["dropout"], [group(doc, runs, f"dropout:{arm}:{p:g}") for p in rules["dropout"]],
             arm, COLOR[arm])  # fmt: skip
    ax.set_xlabel("Dropout p after every hidden sigmoid (fig1 network)")
    ax.set_title("Part 4: regularization", fontsize=10)
    ax = axes[2]
    ghost = rules["ghost"]
    draw(ax, ghost, [group(doc, runs, f"batch:ghost:{k}") for k in ghost], "ghost BN", COLOR["bn"])
    draw(ax, rules["renorm_at"], [group(doc, runs, f"batch:renorm:{k}") for k in rules["renorm_at"]],
         "Batch Renorm", COLOR["noisy-strong"], "s")  # fmt: skip
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ghost, [str(k) for k in ghost])
    ax.set_xlabel("examples per ghost batch (batch of 60; 60 = BN)")
    ax.set_title("Part 5: the batch BN's statistics come from", fontsize=10)
    for ax in axes:
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, stem)


# -- part 6: the scale of the weights as a learning rate ------------------------------------------

# part 6's unscaled runs, each against the scaled one of its (a, seed)
TWINS = {
    "hidden-lr": "lr / a² on the hidden weights",
    "all-lr": "lr / a² on every parameter",
    "hidden-lr-eps": "lr / a² on the hidden weights, BN's ε / a²",
}


def scale_arm(doc: dict, runs: dict[str, runfiles.RunFiles], a: float, arm: str) -> Arm:
    return group(doc, runs, f"scale:{a:g}:{arm}")


def largest_gaps(scaled: Arm, twin: Arm, a: float) -> dict[int, tuple[float, float]]:
    """Per seed of both: the largest |validation accuracy difference| and the largest relative
    difference of a hidden weight matrix's norm (‖V‖ / a against ‖W‖) over the evaluations of
    both runs after step 0 (NaN if either diverged)."""
    out = {}
    for s, r in scaled.runs.items():
        t = twin.runs.get(s)
        if t is None:
            continue
        if _diverged(r) or _diverged(t):
            out[s] = (math.nan, math.nan)
            continue
        x = {q["step"]: q["val_acc"] for q in r.records if "val_acc" in q}
        y = {q["step"]: q["val_acc"] for q in t.records if "val_acc" in q}
        acc = max(abs(x[k] - y[k]) for k in set(x) & set(y) - {0})
        out[s] = (acc, max(norm_gap(r, t, a).values()))
    return out


def norm_gap(scaled: runfiles.RunFiles, twin: runfiles.RunFiles, a: float) -> dict[int, float]:
    """Step → |‖V‖ / a − ‖W‖| / ‖W‖, the largest over the hidden layers, at every evaluation
    after step 0 that both runs recorded (at step 0, V = aW by construction)."""
    w = {q["step"]: q["w_norm"] for q in twin.records if "w_norm" in q}
    return {
        q["step"]: max(abs(u / a - v) / v for u, v in zip(q["w_norm"], w[q["step"]], strict=True))
        for q in scaled.records
        if "w_norm" in q and q["step"] in w and q["step"] > 0
    }


def equivalent(doc: dict, scaled: Arm, twin: Arm):
    """The registered test of part 6: (scaled − twin final test accuracy with its interval,
    True / False, or None while a seed is missing)."""
    rules = doc["protocol"]["rules"]
    diff = _paired(_final(scaled), _final(twin))
    if not set(scaled.runs) == set(twin.runs) == set(rules["scale_seeds"]):
        return diff, None
    if any(map(_diverged, [*scaled.runs.values(), *twin.runs.values()])) or diff is None:
        return diff, False
    w = rules["equivalent_within"]
    return diff, diff.low is not None and -w <= diff.low and diff.high <= w


def _scale_table(doc: dict, runs: dict[str, runfiles.RunFiles]) -> str:
    rows = [
        "| a | against the scaled run | its final test | scaled − it (test) | largest "
        "validation accuracy difference over the run, per seed | largest weight-norm "
        "difference, per seed |",
        "|---|---|---|---|---|---|",
    ]
    for a in doc["protocol"]["rules"]["scale_at"]:
        scaled = scale_arm(doc, runs, a, "scaled")
        rows.append(f"| {a:g} | (the scaled run) | {_mean_pct(_final(scaled))} | | | |")
        for arm, label in TWINS.items():
            twin = scale_arm(doc, runs, a, arm)
            div = sum(map(_diverged, twin.runs.values()))
            gaps = largest_gaps(scaled, twin, a)
            acc = ", ".join(
                "—" if math.isnan(g[0]) else f"{100 * g[0]:.2f} pt" for g in gaps.values()
            )
            norm = ", ".join("—" if math.isnan(g[1]) else f"{g[1]:.1e}" for g in gaps.values())
            final = _mean_pct(_final(twin)) + (f" ({div} diverged)" if div else "")
            diff = _pts(_paired(_final(scaled), _final(twin)))
            rows.append(f"| {a:g} | {label} | {final} | {diff} | {acc or '—'} | {norm or '—'} |")
    return "\n".join(rows)


def scale_verdicts(doc: dict, runs: dict[str, runfiles.RunFiles]) -> list[tuple[str, str, str]]:
    """Verdicts 14 and 15 (part 6), by the registered rules."""
    rules, out = doc["protocol"]["rules"], []
    claims = (
        ("hidden-lr", "14. Scaling the weights into BN by a trains them as lr / a² would (Sec. "
         "3.3; scaled − lr / a² on the hidden weights, test)", ("reproduced", "not reproduced")),
        ("hidden-lr-eps", "15. What separates them is BN's ε (scaled − the same with ε / a², "
         "test)", ("yes", "no")),
    )  # fmt: skip
    for arm, claim, (yes, no) in claims:
        said, held = [], {}
        for a in rules["scale_at"]:
            diff, ok = equivalent(
                doc, scale_arm(doc, runs, a, "scaled"), scale_arm(doc, runs, a, arm)
            )
            decided = ok is not None and len(rules["scale_seeds"]) > 1
            said.append(f"a = {a:g}: {_pts(diff)}" + ("" if not decided else
                        " (equivalent)" if ok else " (not equivalent)"))  # fmt: skip
            held[a] = ok
        if any(v is None for v in held.values()):
            verdict = "pending"
        elif all(held.values()):
            verdict = yes
        elif any(held.values()):
            verdict = "partly: at a = " + ", ".join(f"{a:g}" for a, v in held.items() if v)
        else:
            verdict = no
        w = 100 * rules["equivalent_within"]
        out.append((claim, "; ".join(said) + f"; equivalent: the interval inside ±{w:g} pt",
                    verdict))  # fmt: skip
    if len(rules["scale_seeds"]) < 2:
        out = [(c, m, v if v == "pending" else "undecided: one seed, no interval")
               for c, m, v in out]  # fmt: skip
    return out


def plot_scale(doc: dict, runs: dict[str, runfiles.RunFiles], stem: Path) -> list[Path]:
    """Part 6, per a (columns): validation accuracy over training of the scaled run and its
    three twins (mean, min–max over seeds), and the relative difference of the hidden weight
    norms, ‖V‖ / a against ‖W‖ (largest over the layers, mean over seeds)."""
    from matplotlib.figure import Figure

    scales = doc["protocol"]["rules"]["scale_at"]
    fig = Figure(figsize=(max(7.0, 6.0 * len(scales)), 7.0), layout="constrained")
    axes = fig.subplots(2, len(scales), squeeze=False)
    colors = {"scaled": COLOR["bn"], "hidden-lr": COLOR["noisy-weak"],
              "all-lr": COLOR["plain"], "hidden-lr-eps": COLOR["noisy-strong"]}  # fmt: skip
    styles = {"scaled": "-", "hidden-lr": "--", "all-lr": ":", "hidden-lr-eps": "-."}
    for col, a in enumerate(scales):
        scaled = scale_arm(doc, runs, a, "scaled")
        ax = axes[0][col]
        for arm in ("scaled", *TWINS):
            group_ = scale_arm(doc, runs, a, arm)
            curves = [_curve(r, lambda x: x.get("val_acc")) for r in group_.runs.values()
                      if not _diverged(r)]  # fmt: skip
            if curves:
                label = "scaled by a, lr 1" if arm == "scaled" else TWINS[arm]
                band(ax, curves, f"{label} (n={len(curves)})", color=colors[arm],
                     linestyle=styles[arm])  # fmt: skip
        ax.set_ylim(0.8, 1.0)
        ax.set_title(f"a = {a:g}: validation accuracy (below 0.8: off the axis)", fontsize=10)
        ax = axes[1][col]
        for arm in ("hidden-lr", "hidden-lr-eps"):
            twin = scale_arm(doc, runs, a, arm)
            curves = []
            for s, r in scaled.runs.items():
                t = twin.runs.get(s)
                if t is None or _diverged(r) or _diverged(t):
                    continue
                gap = norm_gap(r, t, a)
                curves.append((list(gap), [max(g, 1e-9) for g in gap.values()]))
            if curves:
                band(ax, curves, f"scaled against {TWINS[arm]}", color=colors[arm],
                     linestyle=styles[arm])  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"a = {a:g}: |‖V‖ / a − ‖W‖| / ‖W‖, largest hidden layer", fontsize=10)
        for ax in axes[:, col]:
            ax.set_xlabel("training steps")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # nothing finished yet: no legend
                ax.legend(fontsize=8)
    return save_figure(fig, stem)


def _part2_section(doc: dict, runs: dict[str, runfiles.RunFiles], folder: Path) -> str:
    plot_lr(doc, runs, folder / "mechanism_lr")
    return (
        "Final validation accuracy, mean over seeds (a cell is stable if no seed diverged and "
        "it is within 1 point of the network's best):\n\n"
        + _lr_table(doc, runs)
        + "\n\n"
        + _norm_table(doc, runs)
        + "\n\n![final accuracy against the learning rate](mechanism_lr.png)"
    )


def _later_section(doc: dict, runs: dict[str, runfiles.RunFiles], folder: Path) -> str:
    plot_later(doc, runs, folder / "mechanism_later")
    return (
        "### Part 3: depth (each network at its best lr of three, chosen on validation)\n\n"
        + _depth_table(doc, runs)
        + "\n\n### Part 4: Dropout (the fig1 network)\n\n"
        + _dropout_table(doc, runs)
        + "\n\n### Part 5: the size of the batches BN's statistics come from (fig1, with BN)"
        "\n\n"
        + _batch_table(doc, runs)
        + "\n\nDifferences: mean over seeds, paired, with a t 95% interval, in points."
        "\n\n![parts 3–5](mechanism_later.png)"
    )


def _scale_section(doc: dict, runs: dict[str, runfiles.RunFiles], folder: Path) -> str:
    plot_scale(doc, runs, folder / "mechanism_scale")
    return (
        "The fig1 network with BN, the hidden weights scaled by a, against its unscaled twins "
        "(paired by seed; differences of the final test accuracy with a t 95% interval; the "
        "weight-norm difference is |‖V‖ / a − ‖W‖| / ‖W‖, the largest over the layers and "
        "the evaluations):\n\n" + _scale_table(doc, runs) + "\n\n![part 6](mechanism_scale.png)"
    )


# The parts a protocol may leave out: the report's template field → (the rule key that is in
# the protocol when the part is, its verdicts, its section of the report with its figure).
_OPTIONAL_PARTS = {
    "part2": ("lr_grid", part2_verdicts, _part2_section),
    "later": ("depths", later_verdicts, _later_section),
    "scale": ("scale_at", scale_verdicts, _scale_section),
}


def write_report(folder: str | Path, found: Sequence[runfiles.RunFiles]) -> Path:
    """``report.md`` and ``mechanism.png/svg`` of a mechanism study folder."""
    folder = Path(folder)
    doc = runfiles.read_study(folder)
    if "protocol" not in doc:
        raise ReportError(
            f"{folder}: no study.json with a protocol; `batchnorm reproduce mechanism --out "
            f"{folder}` writes one (the report applies its rules)"
        )
    runs = {r.path.name: r for r in found}
    names = list(dict.fromkeys(n for ns in doc["protocol"]["grid"].values() for n in ns))
    missing = [n for n in names if not (n in runs and _finished(runs[n]))]
    status = (
        f"**Unfinished: {len(missing)} of {len(names)} runs have not finished**; the numbers and "
        "verdicts below are of the finished runs only and are not the study's result."
        if missing
        else f"All {len(names)} runs have finished."
    )
    tables, table_rows = [], ["| claim | measured | verdict |", "|---|---|---|"]
    for net in nets_of(doc):
        tables.append(f"### {net}\n\n{_table(doc, runs, net)}")
        table_rows += [f"| {c} | {m} | **{v}** |" for c, m, v in verdicts(doc, runs, net)]
    sections = {}
    for field, (key, verdicts_of, section_of) in _OPTIONAL_PARTS.items():
        sections[field] = "(not in this protocol)"
        if key in doc["protocol"]["rules"]:
            table_rows += [f"| {c} | {m} | **{v}** |" for c, m, v in verdicts_of(doc, runs)]
            sections[field] = section_of(doc, runs, folder)
    plot(doc, runs, folder / "mechanism")
    first = next((r for r in runs.values() if _finished(r)), None)
    env = first.env.get("sessions", [{}])[0] if first else {}
    clocks = [x["clock_s"] for r in runs.values() for x in r.records if x.get("clock_s")]
    span = (max(clocks) - min(clocks)) / 60 if clocks else math.nan
    text = template("mechanism.md").substitute(
        name=doc["protocol"]["name"],
        folder=folder,
        registered=doc.get("registered", "unknown"),
        preset=doc.get("preset") or "none (the full study)",
        status=status,
        protocol=doc["protocol"]["text"].strip(),
        rules=", ".join(f"`{k}` = {v}" for k, v in doc["protocol"]["rules"].items()),
        tables="\n\n".join(tables),
        **sections,
        verdicts="\n".join(table_rows),
        minutes=f"{span:.0f}",
        torch=first.versions.get("torch", "?") if first else "?",
        cpu=env.get("cpu", "?"),
        git=env.get("git_revision", "?"),
    )
    path = folder / "report.md"
    write_text(path, text)
    return path
