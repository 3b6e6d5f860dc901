"""The report of the pre-registered Figure 1 study (``batchnorm reproduce mnist`` without
run-choosing flags), from the study folder's files alone.

``study.json`` holds the protocol as registered (its text, the selection metric, the rules'
thresholds, the grid) and, once the grid has run, the winners and each run's role. This module
recomputes the winners from the grid's files with the study's own rule
(:func:`batchnorm.runfiles.select`) and says if they differ from the recorded ones, then applies
the registered verdict rules to the evaluation seeds: the intervals are paired over seeds
(:mod:`.stats`). It writes ``report.md`` and three figures (``study_grid``, ``study_tuned``,
``study_drift``) into the study folder.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import runfiles
from .._atomic import write_text
from .common import ReportError, band, first_step, percentile_ranges, template
from .common import figure as _figure
from .common import save_figure as _save
from .paper import FIGURE1 as PAPER
from .stats import Interval, bootstrap, mean_interval

__all__ = ["Drift", "write_study_report"]

FINAL = {"plain": "test_acc", "bn": "test_acc_population"}  # the reported test accuracy
LABEL = {"plain": "without BN", "bn": "with BN"}
COLOR = {"plain": "#444444", "bn": "#1f77b4"}
PCT_COLOR = {15: "#d62728", 50: "#2ca02c", 85: "#9467bd"}


def _setting(cfg: dict) -> str:
    return f"lr {cfg['lr']:g}, init std {cfg['init_std']:g}"


def _series(run: runfiles.RunFiles, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in run.records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _final(run: runfiles.RunFiles, family: str) -> float:
    return _series(run, FINAL[family])[1][-1]


def _first_reach(run: runfiles.RunFiles, key: str, threshold: float) -> int | None:
    return first_step(*_series(run, key), threshold)


# -- claim 4: drift ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """How much the last hidden layer's sigmoid inputs move: per unit, the range (max − min)
    of the median and of the 15–85 spread, averaged over the layer's units; ``after``: over
    the records after the network first reaches the validation accuracy of the rule (None:
    never reached, or fewer than 2 records after it); ``whole``: over the whole run after
    step 0."""

    whole_median: float
    whole_spread: float
    after_median: float | None
    after_spread: float | None
    reached: int | None  # the step the network first reached the accuracy
    since: int  # the first step after 0 with every unit's records
    # the drawn unit (recorded at every evaluation, so its whole run includes the early phase
    # that every-unit records, every layer_every steps, can miss): not the registered measure
    unit_median: float | None = None
    unit_spread: float | None = None


def _ranges(records: Sequence[dict]) -> tuple[float, float] | None:
    """:func:`percentile_ranges` of every unit, averaged over the layer's units."""
    if len(records) < 2:
        return None
    per_unit = [
        percentile_ranges(*([r[f"layer_p{q}"][u] for r in records] for q in (15, 50, 85)))
        for u in range(len(records[0]["layer_p50"]))
    ]
    return statistics.fmean(p[0] for p in per_unit), statistics.fmean(p[1] for p in per_unit)


def drift(run: runfiles.RunFiles, metric: str, after: float) -> Drift:
    """:class:`Drift` of one run (``metric``: its validation accuracy key)."""
    layer = [r for r in run.records if r["step"] > 0 and r.get("layer_p50") is not None]
    whole = _ranges(layer)
    if whole is None:
        raise ReportError(
            f"{run.path}: fewer than 2 records of every unit's percentiles after step 0 "
            "(metrics.jsonl holds them; metrics.csv does not)"
        )
    reached = _first_reach(run, metric, after)
    late = _ranges([r for r in layer if r["step"] >= reached]) if reached is not None else None
    unit = [r for r in run.records if r["step"] > 0 and r.get("unit_p50") is not None]
    unit_ranges = (
        percentile_ranges(*([r[f"unit_p{q}"] for r in unit] for q in (15, 50, 85)))
        if len(unit) > 1
        else (None, None)
    )
    return Drift(*whole, *(late or (None, None)), reached, layer[0]["step"], *unit_ranges)


def _ratio(plain: float | None, bn: float | None) -> float | None:
    if plain is None or bn is None:
        return None
    return plain / max(bn, 1e-12)


# -- the study's files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    folder: Path
    doc: dict
    runs: dict[str, runfiles.RunFiles]  # by folder name

    @property
    def rules(self) -> dict:
        return self.doc["protocol"]["rules"]

    @property
    def metric(self) -> dict[str, str]:
        return self.doc["protocol"]["metric"]

    def grid(self, family: str) -> list[runfiles.RunFiles]:
        return [self.runs[n] for n in self.doc["protocol"]["grid"][family] if n in self.runs]

    def role(self, role: str) -> list[runfiles.RunFiles]:
        return [self.runs[n] for n in self.doc.get("roles", {}).get(role, []) if n in self.runs]

    def by_seed(self, role: str) -> dict[int, dict[str, runfiles.RunFiles]]:
        """{seed: {family: run}} of a role's runs, seeds where both networks finished."""
        out: dict[int, dict[str, runfiles.RunFiles]] = {}
        for r in self.role(role):
            if _finished(r):
                out.setdefault(r.config["seed"], {})[r.network["name"]] = r
        return {s: pair for s, pair in sorted(out.items()) if set(pair) == {"plain", "bn"}}


def _finished(run: runfiles.RunFiles) -> bool:
    return bool(run.records) and run.records[-1]["step"] == run.config["steps"]


def _pair_at(study: Study, cfg: dict) -> dict[str, runfiles.RunFiles]:
    """The grid's two runs (seed 0) at ``cfg``'s setting."""
    out = {}
    for family in ("plain", "bn"):
        for r in study.grid(family):
            if (r.config["lr"], r.config["init_std"]) == (cfg["lr"], cfg["init_std"]):
                out[family] = r
    return out


# -- verdicts -------------------------------------------------------------------------------------


def _interval_verdict(iv: Interval) -> str:
    if iv.above:
        return "reproduced"
    return "partly" if iv.value > 0 else "not reproduced"


def _range_verdict(iv: Interval, lo: float, hi: float, tol: float) -> str:
    low = iv.value if iv.low is None else iv.low
    high = iv.value if iv.high is None else iv.high
    for widen, verdict in ((tol, "reproduced"), (3 * tol, "partly")):
        if high >= lo - widen and low <= hi + widen:
            return verdict
    return "not reproduced (" + ("higher" if low > hi else "lower") + ")"


def _count_verdict(k: int, n: int) -> str:
    if n and k == n:
        return "reproduced"
    return f"partly: {k} of {n}" if k else f"not reproduced (0 of {n})"


def _faster(study: Study, pair: dict[str, runfiles.RunFiles]) -> float:
    """Claim 3 for one seed: the fraction of the run the BN network needs to reach the
    baseline's final validation accuracy (inf: never)."""
    last = study.doc["protocol"]["last"]
    target = runfiles.score(pair["plain"], study.metric["plain"], last)
    step = _first_reach(pair["bn"], study.metric["bn"], target)
    return math.inf if step is None else step / pair["bn"].config["steps"]


def _fmt_frac(values: Sequence[float]) -> str:
    return ", ".join("never" if math.isinf(v) else f"{v:.0%}" for v in values)


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.1f}×"


def _mean_or_inf(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if all(math.isfinite(x) for x in xs) else math.inf


def _claims(study: Study) -> tuple[list[tuple[str, str, str]], dict]:
    rules = study.rules
    tuned = study.by_seed("tuned")
    if not tuned:
        raise ReportError(
            f"{study.folder}: no tuned pair has finished yet (study.json names the runs of each "
            "role once the grid is done); run the same command again to continue the study"
        )
    seeds = list(tuned)
    rows = []
    diffs = [_final(p["bn"], "bn") - _final(p["plain"], "plain") for p in tuned.values()]
    d = mean_interval(diffs, rules["ci"])
    rows.append(
        (
            "1. BN ends with a higher test accuracy (tuned vs tuned)",
            f"BN − baseline {d.fmt(100, 2, ' pt')}, paired over seeds {seeds}",
            _interval_verdict(d),
        )
    )
    for family in ("bn", "plain"):
        lo, hi = PAPER[family]
        iv = mean_interval([_final(p[family], family) for p in tuned.values()], rules["ci"])
        steps = next(iter(tuned.values()))[family].config["steps"]
        verdict = _range_verdict(iv, lo, hi, rules["reading_tol"])
        if steps < 50_000:
            verdict = "not comparable (fewer than the paper's 50,000 steps)"
        rows.append(
            (
                f"2. final test accuracy {LABEL[family]} ≈ {lo:.2f}–{hi:.2f} (by eye)",
                (
                    f"{iv.value:.4f} [{iv.low:.4f}, {iv.high:.4f}] (n={iv.n})"
                    if iv.low is not None
                    else f"{iv.value:.4f} (n=1)"
                )
                + f"; the range widened by {rules['reading_tol']:g}: "
                f"{lo - rules['reading_tol']:.4f}–{hi + rules['reading_tol']:.4f}",
                verdict,
            )
        )
    fracs = [_faster(study, p) for p in tuned.values()]
    k = sum(f <= rules["faster_fraction"] for f in fracs)
    boot = bootstrap(fracs, _mean_or_inf)
    ci = (
        f"; mean {boot.value:.0%} [{boot.low:.0%}, {boot.high:.0%}] (bootstrap)"
        if boot.low is not None and math.isfinite(boot.value)
        else ""
    )
    rows.append(
        (
            "3. BN rises faster (reaches the tuned baseline's final validation accuracy in ≤ "
            f"{rules['faster_fraction']:.0%} of the run)",
            f"after {_fmt_frac(fracs)} of the steps (seeds {seeds}){ci}",
            _count_verdict(k, len(fracs)),
        )
    )
    drifts = {}  # (setting, seed) -> {family: Drift}; both winners at one setting: counted once
    for role in ("same-setting:plain", "same-setting:bn"):
        for seed, pair in study.by_seed(role).items():
            key = (_setting(pair["bn"].config), seed)
            drifts[key] = {
                f: drift(r, study.metric[f], rules["drift_after"]) for f, r in pair.items()
            }
    for what, attr in (("median", "median"), ("15–85 spread", "spread")):
        after = [
            _ratio(getattr(d["plain"], f"after_{attr}"), getattr(d["bn"], f"after_{attr}"))
            for d in drifts.values()
        ]
        whole = [
            _ratio(getattr(d["plain"], f"whole_{attr}"), getattr(d["bn"], f"whole_{attr}"))
            for d in drifts.values()
        ]
        k = sum(r is not None and r >= rules["drift_ratio"] for r in after)
        undefined = sum(r is None for r in after)
        note = (
            f"; {undefined} pair(s) undefined (a network never reached "
            f"{rules['drift_after']:.0%} validation accuracy: counted as not meeting the rule)"
            if undefined
            else ""
        )
        unit = [
            _ratio(getattr(d["plain"], f"unit_{attr}"), getattr(d["bn"], f"unit_{attr}"))
            for d in drifts.values()
        ]
        first = min(x.since for d in drifts.values() for x in d.values())
        rows.append(
            (
                f"4. the {what} of the sigmoid inputs drifts without BN, stays nearly flat with "
                f"it (≥ {rules['drift_ratio']:g}× in every pair)",
                "baseline ÷ BN after "
                f"{rules['drift_after']:.0%}: {', '.join(map(_fmt_ratio, after))}; whole run "
                f"(every unit's records start at step {first:,}): "
                f"{', '.join(map(_fmt_ratio, whole))}{note}. Not the registered measure: the "
                "drawn unit alone at every evaluation, whole run: "
                f"{', '.join(map(_fmt_ratio, unit))}",
                _count_verdict(k, len(after)),
            )
        )
    return rows, drifts


# -- tables ---------------------------------------------------------------------------------------


def _winners(study: Study) -> tuple[dict[str, runfiles.RunFiles], str]:
    """The winners recomputed with the study's rule, and a line saying if they match study.json."""
    last = study.doc["protocol"]["last"]
    recorded = study.doc.get("winners", {})
    winners, notes = {}, []
    for family in ("plain", "bn"):
        grid = study.grid(family)
        if len(grid) < len(study.doc["protocol"]["grid"][family]) or not all(map(_finished, grid)):
            raise ReportError(
                f"{study.folder}: the selection grid has not finished (run the same command "
                "again to continue the study)"
            )
        winners[family] = runfiles.select(grid, study.metric[family], last)
        if recorded.get(family) != winners[family].path.name:
            notes.append(
                f"**{family}: the recomputed winner {winners[family].path.name} differs from "
                f"study.json's {recorded.get(family)}**"
            )
    check = " ".join(notes) or "Recomputed from the grid's files: the same winners as `study.json`."
    return winners, check


def _grid_table(study: Study, winners: dict[str, runfiles.RunFiles]) -> str:
    last, rules = study.doc["protocol"]["last"], study.rules
    rows = [
        f"| lr | init std | validation, without BN (mean of last {last}) | validation, with BN | "
        "test, without BN | test, with BN | BN − baseline (test) | BN needs (claim 3) | "
        f"drift ratio, median / spread, after {rules['drift_after']:.0%} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in study.grid("plain"):
        pair = _pair_at(study, run.config)
        cells = []
        for f in ("plain", "bn"):
            s = runfiles.score(pair[f], study.metric[f], last)
            cells.append(f"**{s:.4f}**" if pair[f] is winners[f] else f"{s:.4f}")
        tests = [_final(pair[f], f) for f in ("plain", "bn")]
        d = {f: drift(pair[f], study.metric[f], rules["drift_after"]) for f in pair}
        med = _ratio(d["plain"].after_median, d["bn"].after_median)
        spread = _ratio(d["plain"].after_spread, d["bn"].after_spread)
        rows.append(
            f"| {run.config['lr']:g} | {run.config['init_std']:g} | {cells[0]} | {cells[1]} | "
            f"{tests[0]:.4f} | {tests[1]:.4f} | {100 * (tests[1] - tests[0]):+.2f} pt | "
            f"{_fmt_frac([_faster(study, pair)])} | {_fmt_ratio(med)} / {_fmt_ratio(spread)} |"
        )
    return "\n".join(rows)


def _tuned_table(study: Study) -> str:
    rows = [
        "| seed | final test, without BN | final test, with BN (population) | BN − baseline |",
        "|---|---|---|---|",
    ]
    for seed, pair in study.by_seed("tuned").items():
        p, b = _final(pair["plain"], "plain"), _final(pair["bn"], "bn")
        rows.append(f"| {seed} | {p:.4f} | {b:.4f} | {100 * (b - p):+.2f} pt |")
    return "\n".join(rows)


def _drift_table(drifts: dict) -> str:
    rows = [
        "| setting | seed | network | reached 90% at | median range after | "
        "spread range after | median range, whole run | spread range, whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    for (setting, seed), d in drifts.items():
        for fam in ("plain", "bn"):
            x = d[fam]
            reached = "never" if x.reached is None else f"{x.reached:,}"
            rows.append(
                f"| {setting} | {seed} | {LABEL[fam]} | {reached} | "
                f"{f(x.after_median)} | {f(x.after_spread)} | {f(x.whole_median)} | "
                f"{f(x.whole_spread)} |"
            )
    return "\n".join(rows)


# -- figures --------------------------------------------------------------------------------------


def plot_grid(study: Study, winners: dict[str, runfiles.RunFiles], stem: Path) -> list[Path]:
    """Validation accuracy over lr × init std for each network; the winner is circled."""
    last = study.doc["protocol"]["last"]
    lrs = sorted({r.config["lr"] for r in study.grid("plain")})
    stds = sorted({r.config["init_std"] for r in study.grid("plain")})
    scores = [
        runfiles.score(r, study.metric[f], last) for f in ("plain", "bn") for r in study.grid(f)
    ]
    finite = [s for s in scores if math.isfinite(s)]
    low, high = max(min(finite), max(finite) - 0.1), max(finite)  # 0.1 of colour at most
    fig, axes = _figure(11.0, 3.8, 2)
    for ax, family in zip(axes, ("plain", "bn"), strict=True):
        table = [[math.nan] * len(lrs) for _ in stds]
        for r in study.grid(family):
            i, j = stds.index(r.config["init_std"]), lrs.index(r.config["lr"])
            table[i][j] = runfiles.score(r, study.metric[family], last)
        image = ax.imshow(table, cmap="viridis", vmin=low, vmax=high, origin="lower", aspect="auto")
        for i, row in enumerate(table):
            for j, v in enumerate(row):
                dark = not v > low + 0.6 * (high - low)  # white on the dark end of viridis
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")  # fmt: skip
        w = winners[family].config
        ax.scatter(
            [lrs.index(w["lr"])], [stds.index(w["init_std"])], s=900, facecolors="none",
            edgecolors="red", linewidths=2,
        )  # fmt: skip
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
        ax.set_yticks(range(len(stds)), [f"{v:g}" for v in stds])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("init std")
        ax.set_title(f"{LABEL[family]}: validation accuracy (seed 0; circle: winner)", fontsize=10)
    fig.colorbar(image, ax=axes, label="validation accuracy (one colour scale)")
    return _save(fig, stem)


def plot_tuned(study: Study, stem: Path) -> list[Path]:
    """Figure 1(a) tuned vs tuned: test accuracy, mean over the evaluation seeds, min–max band."""
    tuned = study.by_seed("tuned")
    fig, (ax, zoom) = _figure(11.0, 3.8, 2)
    for family in ("plain", "bn"):
        runs = [p[family] for p in tuned.values()]
        label = f"{LABEL[family]} ({_setting(runs[0].config)}; n={len(runs)})"
        for a in (ax, zoom):
            band(a, [_series(r, FINAL[family]) for r in runs], label, color=COLOR[family], lw=1.5)
    ax.set_ylim(0.4, 1.0)
    ax.set_title("(a) test accuracy, tuned vs tuned (band: min–max over seeds)", fontsize=10)
    finals = [_final(p[f], f) for p in tuned.values() for f in ("plain", "bn")]
    zoom.set_ylim(math.floor(min(finals) * 100 - 1) / 100, 1.0)
    zoom.set_title("zoom", fontsize=10)
    for a in (ax, zoom):
        a.set_xlabel("training steps")
        a.grid(alpha=0.3)
    ax.set_ylabel("test accuracy")
    zoom.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(fig, stem)


def plot_drift(study: Study, role: str, stem: Path) -> list[Path]:
    """Figure 1(b, c) at one winner's setting: the drawn unit's 15th/50th/85th percentiles,
    mean over seeds with min–max bands, without and with BN on one y axis."""
    pairs = study.by_seed(role)
    fig, axes = _figure(11.0, 3.8, 2)
    for ax, family, title in zip(axes, ("plain", "bn"), ("(b)", "(c)"), strict=True):
        runs = [p[family] for p in pairs.values()]
        for q in (85, 50, 15):
            band(ax, [_series(r, f"unit_p{q}") for r in runs], f"{q}th percentile",
                 color=PCT_COLOR[q], lw=1.5)  # fmt: skip
        cfg = runs[0].config
        ax.set_title(
            f"{title} {LABEL[family]}: unit {cfg['probe_unit']} ({_setting(cfg)}; n={len(runs)})",
            fontsize=10,
        )
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    lo = min(a.get_ylim()[0] for a in axes)
    hi = max(a.get_ylim()[1] for a in axes)
    for a in axes:
        a.set_ylim(lo, hi)
    axes[0].set_ylabel("sigmoid input")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(fig, stem)


# -- the report -----------------------------------------------------------------------------------


def write_study_report(folder: str | Path, runs: Sequence[runfiles.RunFiles]) -> Path:
    """``report.md`` and the study figures of a pre-registered MNIST study folder."""
    folder = Path(folder)
    study = Study(folder, runfiles.read_study(folder), {r.path.name: r for r in runs})
    winners, check = _winners(study)
    claims, drifts = _claims(study)
    plot_grid(study, winners, folder / "study_grid")
    plot_tuned(study, folder / "study_tuned")
    figures, drawn = [], set()
    for role in ("same-setting:bn", "same-setting:plain"):
        pairs = study.by_seed(role)
        setting = _setting(next(iter(pairs.values()))["bn"].config) if pairs else None
        if pairs and setting not in drawn:
            drawn.add(setting)
            stem = f"study_drift_{role.split(':')[1]}"
            plot_drift(study, role, folder / stem)
            figures.append(f"![Figure 1(b, c) at {setting}]({stem}.png)")
    verdicts = ["| claim (Sec. 4.1, Figure 1) | measured | verdict |", "|---|---|---|"]
    verdicts += [f"| {c} | {m} | **{v}** |" for c, m, v in claims]
    proto = study.doc["protocol"]
    first = next(iter(study.by_seed("tuned").values()))
    env = first["bn"].env.get("sessions", [{}])[0]
    text = template("mnist_protocol.md").substitute(
        name=proto["name"],
        folder=folder,
        registered=study.doc.get("registered", "unknown"),
        preset=study.doc.get("preset") or "none (the full study)",
        protocol=proto["text"].strip(),
        rules=", ".join(f"`{k}` = {v}" for k, v in proto["rules"].items()),
        check=check,
        plain_winner=_setting(winners["plain"].config),
        bn_winner=_setting(winners["bn"].config),
        grid=_grid_table(study, winners),
        tuned=_tuned_table(study),
        verdicts="\n".join(verdicts),
        drift=_drift_table(drifts),
        drift_figures="\n\n".join(figures),
        torch=first["bn"].versions.get("torch", "?"),
        batchnorm=first["bn"].versions.get("batchnorm", "?"),
        cpu=env.get("cpu", "?"),
        git=env.get("git_revision", "?"),
    )
    path = folder / "report.md"
    write_text(path, text)
    return path
