"""Figure 1 plots and the Markdown reports of ``batchnorm reproduce mnist``, from the runs' files alone.

Each network of Figure 1 is its own run (:mod:`batchnorm.runfiles`); this module pairs the two
networks of a setting and seed (:func:`find_pairs`) and reports each pair (``figure1.png`` and
``report.md`` in a folder named after the setting) and the whole study folder (``report.md``:
mean and spread over seeds, verdicts for the main setting — the one ``study.json`` names, else
the one with the most seeds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import runfiles
from .._atomic import write_text
from .common import ReportError, first_step, percentile_ranges, template
from .common import figure as _figure
from .common import fmt_mean as _fmt_mean
from .common import fmt_short as _fmt_short
from .common import save_figure as _save
from .paper import FIGURE1 as PAPER
from .paper import FIGURE1_READING_TOL as READING_TOL
from .paper import FIGURE1_STEPS as PAPER_STEPS

__all__ = [
    "Run",
    "Summary",
    "find_pairs",
    "plot_figure1",
    "plot_sweep",
    "summarize",
    "write_reports",
    "write_run_report",
    "write_sweep_report",
]

THRESHOLDS = (0.95, 0.97)
NETS = {
    "plain": "without BN",
    "bn_population": "with BN, population statistics (Alg. 2)",
    "bn_ema": "with BN, moving-average statistics",
}


@dataclass(frozen=True)
class Run:
    """The two networks of one setting and seed, as one run: each record holds both networks'
    measurements under the joint keys (``test_acc_plain``, ``test_acc_bn_population``, ...;
    :data:`batchnorm.runfiles.MNIST_JOINT_KEYS`)."""

    path: Path  # where this pair's figure and report go
    config: dict  # the shared settings (no "network")
    versions: dict
    env: dict
    records: list[dict]
    sensitivity: dict | None = None
    source: str = runfiles.METRICS
    members: tuple[Path, ...] = ()  # the run folders of the two networks

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record where ``key`` has a value."""
        pts = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


_TO_JOINT = {(net, key): joint for joint, (net, key) in runfiles.MNIST_JOINT_KEYS.items()}
_SHARED = ("step", "epoch")


def _joint(plain: runfiles.RunFiles, bn: runfiles.RunFiles) -> list[dict]:
    out = []
    for rp, rb in zip(plain.records, bn.records, strict=False):
        if rp["step"] != rb["step"]:
            break
        rec = {k: rp[k] for k in _SHARED if k in rp}
        for net, r in (("plain", rp), ("bn", rb)):
            for key, value in r.items():
                if key in _SHARED:
                    continue
                if key == "eval_s":
                    rec["eval_s"] = rec.get("eval_s", 0.0) + value
                    continue
                joint = _TO_JOINT.get((net, key))
                if joint is None and net == "bn" and key.startswith("val_"):
                    joint = key.replace("_population", "") + (
                        "_bn_population" if key.endswith("_population") else "_bn_ema"
                    )
                rec[joint or f"{key}_{net}"] = value
        out.append(rec)
    return out


def _setting_name(cfg: dict) -> str:
    return f"lr{cfg['lr']:g}_std{cfg['init_std']:g}_eps{cfg['eps']:g}_seed{cfg['seed']}"


def find_pairs(folder: str | Path, runs: Sequence[runfiles.RunFiles] | None = None) -> list[Run]:
    """The pairs (without BN, with BN) of the MNIST runs in ``folder`` (or of ``runs``), one per
    setting and seed, sorted by name; a network without its twin is left out."""
    folder = Path(folder)
    runs = runfiles.find_runs(folder) if runs is None else runs
    groups: dict[str, dict[str, runfiles.RunFiles]] = {}
    for r in runs:
        if r.experiment != "mnist":
            continue
        shared = {k: v for k, v in r.config.items() if k != "network"}
        groups.setdefault(repr(sorted(shared.items())), {})[r.network["name"]] = r
    pairs = []
    for nets in groups.values():
        if set(nets) != {"plain", "bn"}:
            continue
        plain, bn = nets["plain"], nets["bn"]
        cfg = {k: v for k, v in bn.config.items() if k != "network"}
        # schema 1: both networks lived in one folder, which keeps the pair's report
        home = bn.path if bn.path == plain.path else bn.path.parent / _setting_name(cfg)
        pairs.append(
            Run(
                home,
                cfg,
                bn.versions,
                bn.env,
                _joint(plain, bn),
                bn.extra.get("population_batches"),
                bn.source if bn.source != runfiles.METRICS else plain.source,
                (plain.path, bn.path),
            )
        )
    return sorted(pairs, key=lambda p: p.name)


# -- numbers ------------------------------------------------------------------------------------


def _drift(run: Run, net: str) -> dict[str, float]:
    """How much the percentiles of the last hidden layer's sigmoid inputs move during training.

    After step 0: the range (max − min) of the median, and the range of the 15–85 spread, for
    the documented unit (every evaluation) and averaged over all units of the layer (at the
    evaluations that record them, every ``layer_every`` steps and the last).
    """
    recs = [r for r in run.records if r["step"] > 0]
    if not recs:
        return {}

    unit_med, unit_spread = percentile_ranges(
        *([r[f"unit_p{q}_{net}"] for r in recs] for q in (15, 50, 85))
    )
    out = {
        "unit_median_range": unit_med,
        "unit_spread_range": unit_spread,
        "unit_final": [recs[-1][f"unit_p{q}_{net}"] for q in (15, 50, 85)],
    }
    # every unit's percentiles are recorded every layer_every steps (metrics.csv has none)
    layer = [r for r in recs if f"layer_p50_{net}" in r]
    if len(layer) < 2:
        return out
    units = len(layer[0][f"layer_p50_{net}"])
    per_unit = [
        percentile_ranges(*([r[f"layer_p{q}_{net}"][u] for r in layer] for q in (15, 50, 85)))
        for u in range(units)
    ]
    out["layer_median_range"] = statistics.fmean(p[0] for p in per_unit)
    out["layer_spread_range"] = statistics.fmean(p[1] for p in per_unit)
    return out


@dataclass(frozen=True)
class Summary:
    """The numbers of one run that the reports print."""

    steps: int
    final: dict[str, float]  # net -> final test accuracy
    # net -> {"0.95": step, "0.97": step, "plain_final": step}; None where never reached
    to_threshold: dict[str, dict[str, int | None]]
    train_loss: dict[str, float | None]  # "plain"/"bn" -> mean loss over the last interval
    drift: dict[str, dict[str, float]]
    wall_s: float  # training + evaluation, summed over sessions
    step_us: dict[str, float]  # mean time of one SGD step per network
    sessions: int


def summarize(run: Run) -> Summary:
    last = run.records[-1]
    final = {net: last[f"test_acc_{net}"] for net in NETS}
    to = {}
    for net in NETS:
        steps, acc = run.series(f"test_acc_{net}")
        to[net] = {f"{t:.2f}": first_step(steps, acc, t) for t in THRESHOLDS}
        to[net]["plain_final"] = first_step(steps, acc, final["plain"])
    train_s = {net: last.get(f"train_{net}_s", math.nan) for net in ("plain", "bn")}
    wall = sum(train_s.values()) + sum(r.get("eval_s", 0.0) for r in run.records)
    return Summary(
        steps=last["step"],
        final=final,
        to_threshold=to,
        train_loss={net: last.get(f"train_loss_{net}") for net in ("plain", "bn")},
        drift={net: _drift(run, net) for net in ("plain", "bn")},
        wall_s=wall,
        step_us={net: 1e6 * s / max(last["step"], 1) for net, s in train_s.items()},
        sessions=len(run.env.get("sessions", [])),
    )


def _verdicts(
    finals: dict[str, list[float]], summaries: list[Summary]
) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) for the paper's Figure 1 claims, over one or more seeds."""
    out = []
    bn, plain = finals["bn_population"], finals["plain"]
    wins = sum(b > p for b, p in zip(bn, plain, strict=True))
    verdict = "reproduced" if wins == len(bn) else "partly" if wins else "not reproduced"
    out.append(
        (
            "BN network ends with a higher test accuracy",
            f"BN {_fmt_mean(bn)} vs {_fmt_mean(plain)} without; higher in {wins} of {len(bn)} seeds",
            verdict,
        )
    )
    for key, label in (("bn", "with BN"), ("plain", "without BN")):
        lo, hi = PAPER[key]
        vals = bn if key == "bn" else plain
        m = statistics.fmean(vals)
        if summaries[0].steps < PAPER_STEPS:
            verdict = f"not comparable: this run has fewer than the paper's {PAPER_STEPS:,} steps"
        elif lo - READING_TOL <= m <= hi + READING_TOL:
            verdict = "reproduced"
        elif lo - 3 * READING_TOL <= m <= hi + 3 * READING_TOL:
            verdict = "partly (just " + ("above" if m > hi else "below") + " the by-eye range)"
        else:
            verdict = "not reproduced (" + ("higher" if m > hi else "lower") + ")"
        out.append(
            (
                f"final accuracy {label} ≈ {lo:.2f}–{hi:.2f} at 50K steps (by eye)",
                f"{_fmt_mean(vals)} at {summaries[0].steps:,} steps",
                verdict,
            )
        )
    faster = []
    for s in summaries:
        to_bn = s.to_threshold["bn_population"]["plain_final"]
        faster.append(to_bn / s.steps if to_bn is not None else math.inf)
    worst = max(faster)
    verdict = "reproduced" if worst <= 0.5 else "partly" if worst < 1 else "not reproduced"
    out.append(
        (
            "BN network rises faster",
            "BN reaches the baseline's final accuracy after "
            + ", ".join(f"{f:.0%}" for f in faster)
            + " of the steps",
            verdict,
        )
    )
    for what, key, claim in (
        (
            "median",
            "median_range",
            "the median of a unit's sigmoid input drifts without BN, stays nearly flat with BN",
        ),
        (
            "15–85 spread",
            "spread_range",
            "the spread (15th–85th percentile) drifts without BN, stays nearly flat with BN",
        ),
    ):
        scopes = [sc for sc in ("unit", "layer") if all(_has_scope(s, sc) for s in summaries)]
        ratios = {
            scope: [
                s.drift["plain"][f"{scope}_{key}"] / max(s.drift["bn"][f"{scope}_{key}"], 1e-12)
                for s in summaries
            ]
            for scope in scopes
        }
        ok = [min(r) >= 2 for r in ratios.values()]
        verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
        layer = (
            ", ".join(f"{r:.1f}×" for r in ratios["layer"])
            + " averaged over the layer's units (the bar for reproduced: ≥ 2× in both)"
            if "layer" in ratios
            else "(the layer's other units are not in these files: metrics.jsonl is missing; "
            "the bar for reproduced: ≥ 2×)"
        )
        out.append(
            (
                claim,
                f"the {what} moves "
                + ", ".join(f"{r:.1f}×" for r in ratios["unit"])
                + " as much without BN as with it for the drawn unit, "
                + layer,
                verdict,
            )
        )
    return out


# -- plots --------------------------------------------------------------------------------------


def _acc_ylim(values: Sequence[float]) -> tuple[float, float]:
    """The paper's 0.7–1.0 when the curves live there, else enough room to show them."""
    lo = min(values)
    return (0.7, 1.0) if lo >= 0.7 else (max(0.0, math.floor(lo * 10) / 10), 1.0)


def plot_figure1(run: Run, stem: Path | None = None) -> list[Path]:
    """Figure 1 for one run: (a) test accuracy vs steps; (b, c) percentiles without / with BN."""
    cfg = run.config
    fig, (ax_a, ax_b, ax_c) = _figure(13.5, 4.0, 3)
    late = [r for r in run.records if r["step"] >= 0.2 * cfg["steps"]]
    for key, style in (
        ("bn_population", dict(color="C0", lw=1.8, label="with BN (population stats)")),
        ("bn_ema", dict(color="C0", lw=0.9, ls=":", label="with BN (moving-average stats)")),
        ("plain", dict(color="k", lw=1.5, ls="--", label="without BN")),
    ):
        ax_a.plot(*run.series(f"test_acc_{key}"), **style)
    ax_a.set_ylim(*_acc_ylim([r[f"test_acc_{k}"] for r in late for k in NETS] or [0.0]))
    ax_a.set_xlim(0, cfg["steps"])
    ax_a.set_xlabel("training steps")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title("(a) test accuracy")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right", fontsize=8)
    lims = []
    for ax, net, title in ((ax_b, "plain", "(b) without BN"), (ax_c, "bn", "(c) with BN")):
        steps, p15 = run.series(f"unit_p15_{net}")
        _, p50 = run.series(f"unit_p50_{net}")
        _, p85 = run.series(f"unit_p85_{net}")
        ax.fill_between(steps, p15, p85, color="C1", alpha=0.2, lw=0)
        for vals, label, ls in ((p85, "85th", "-"), (p50, "50th", "-"), (p15, "15th", "-")):
            ax.plot(
                steps, vals, color="C1" if label == "50th" else "C3", ls=ls, lw=1.3, label=label
            )
        ax.set_title(f"{title}: unit {cfg['probe_unit']} of the last hidden layer", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("training steps")
        ax.set_xlim(0, cfg["steps"])
        ax.grid(alpha=0.3)
        lims += p15 + p85
    lo, hi = min(lims), max(lims)
    ylim = (-2.0, 2.0) if lo >= -2 and hi <= 2 else (math.floor(lo), math.ceil(hi))
    for ax in (ax_b, ax_c):
        ax.set_ylim(*ylim)
    ax_b.set_ylabel("sigmoid input (15th, 50th, 85th percentile)")
    fig.suptitle(
        f"{cfg['dataset']}, 784-100-100-100-10 sigmoid MLP: lr {cfg['lr']:g}, init std {cfg['init_std']:g}, "
        f"batch {cfg['batch_size']}, seed {cfg['seed']}",
        fontsize=10,
    )
    return _save(fig, stem or run.path / "figure1")


def _group_key(cfg: dict) -> tuple:
    return (cfg["lr"], cfg["init_std"], cfg["eps"], cfg["steps"], cfg["batch_size"])


def _group_label(cfg: dict) -> str:
    return f"lr {cfg['lr']:g}, std {cfg['init_std']:g}, eps {cfg['eps']:g}"


def _groups(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(_group_key(r.config), []).append(r)
    return groups


def _main_group(groups: dict[tuple, list[Run]], main: dict) -> list[Run]:
    """The setting the verdicts are given for: ``main`` (from ``study.json``) if it was run, else
    the one with the most seeds."""
    if main:
        key = _group_key(main)
        for k, group in groups.items():
            if k == key:
                return group
    return max(groups.values(), key=len)


def plot_sweep(runs: list[Run], stem: Path) -> list[Path]:
    """Test accuracy vs steps for every setting: the mean over seeds, and the min–max band."""
    fig, (ax, ax_zoom) = _figure(12.0, 4.2, 2)
    for i, (_, group) in enumerate(_groups(runs).items()):
        color = f"C{i % 10}"
        for net, ls in (("bn_population", "-"), ("plain", "--")):
            curves = [g.series(f"test_acc_{net}") for g in group]
            n = min(len(c[0]) for c in curves)
            steps = curves[0][0][:n]
            vals = [[c[1][j] for c in curves] for j in range(n)]
            mean = [statistics.fmean(v) for v in vals]
            label = f"{_group_label(group[0].config)} ({'BN' if net != 'plain' else 'no BN'}, n={len(group)})"
            for a in (ax, ax_zoom):
                a.plot(steps, mean, color=color, ls=ls, lw=1.4, label=label)
                if len(group) > 1:
                    a.fill_between(
                        steps,
                        [min(v) for v in vals],
                        [max(v) for v in vals],
                        color=color,
                        alpha=0.15,
                        lw=0,
                    )
    ax.set_title("test accuracy (mean over seeds; band: min–max)")
    ax.set_ylim(0, 1)
    ax_zoom.set_title("zoom")
    ax_zoom.set_ylim(0.9, 1.0)
    for a in (ax, ax_zoom):
        a.set_xlabel("training steps")
        a.grid(alpha=0.3)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, stem)


# -- reports ------------------------------------------------------------------------------------


def _fmt_step(s: int | None, steps: int) -> str:
    return f"{s:,}" if s is not None else f"not reached in {steps:,}"


def _fmt_steps(vals: Sequence[int | None], steps: int) -> str:
    reached = [v for v in vals if v is not None]
    if not reached:
        return _fmt_step(None, steps)
    if len(vals) == 1:
        return _fmt_step(vals[0], steps)
    if len(reached) < len(vals):
        return f"{len(reached)} of {len(vals)} seeds, at " + ", ".join(f"{v:,}" for v in reached)
    return f"{statistics.fmean(vals):,.0f} (min {min(vals):,}, max {max(vals):,})"


def _settings_table(cfg: dict) -> str:
    why = {
        "steps": "the paper",
        "batch_size": "the paper",
        "lr": "not in the paper; see the sweep (plain SGD, same for both networks)",
        "init_std": 'not in the paper ("small random Gaussian values"); see the sweep',
        "eps": "not in the paper; torch's default, small against the preactivation variances",
        "bn_momentum": "EMA of the running statistics (torch's default); only the EMA curve uses it",
        "validation": "training images held out (the last N) for choosing settings",
        "eval_every": "steps between test evaluations and checkpoints",
        "population_batches": "training batches of the Alg. 2 population pass (see below)",
        "probe_unit": "the unit drawn in Figure 1(b, c)",
        "probe_examples": "the fixed held-out batch: the first N test images",
        "binarize_threshold": "input = 1 if pixel >= threshold (of 0..255), else 0",
        "hidden": "the paper",
        "seed": "weights, data order and population batches derive from it",
        "dataset": "",
        "threads": "intra-op threads while training (1: predictable on a shared machine; benchmarks/README.md)",
    }
    rows = ["| setting | value | note |", "|---|---|---|"]
    rows += [f"| `{k}` | {v} | {why.get(k, '')} |" for k, v in cfg.items()]
    return "\n".join(rows)


def _numbers_table(summaries: list[Summary]) -> str:
    steps = summaries[0].steps
    rows = [
        "| network | final test accuracy | steps to 95% | steps to 97% | steps to the baseline's final accuracy | final training loss |",
        "|---|---|---|---|---|---|",
    ]
    for net, label in NETS.items():
        losses = [s.train_loss["plain" if net == "plain" else "bn"] for s in summaries]
        loss = "" if net == "bn_ema" or None in losses else _fmt_short(losses, 4)
        rows.append(
            f"| {label} | {_fmt_mean([s.final[net] for s in summaries])} | "
            + " | ".join(
                _fmt_steps([s.to_threshold[net][k] for s in summaries], steps)
                for k in ("0.95", "0.97", "plain_final")
            )
            + f" | {loss} |"
        )
    return "\n".join(rows) + (
        "\n\nThe final training loss is the mean cross-entropy of the training batches since the "
        "previous evaluation (the BN network's in training mode, with batch statistics). Where it "
        "is near zero the network has fit its training set, and what limits its test accuracy is "
        "generalization, not the speed of optimization."
    )


def _paper_table(summaries: list[Summary]) -> str:
    rows = ["| network | paper, Figure 1(a) by eye, 50K steps | measured |", "|---|---|---|"]
    for net, key in (("bn_population", "bn"), ("plain", "plain")):
        lo, hi = PAPER[key]
        rows.append(
            f"| {NETS[net]} | ≈ {lo:.2f}–{hi:.2f} | {_fmt_mean([s.final[net] for s in summaries])} |"
        )
    return "\n".join(rows)


def _has_scope(s: Summary, scope: str) -> bool:
    return all(f"{scope}_median_range" in s.drift[net] for net in ("plain", "bn"))


def _layer_cell(d: list[dict], key: str) -> str:
    if any(key not in x for x in d):
        return "not in the files"
    return _fmt_short([x[key] for x in d])


def _drift_table(summaries: list[Summary], unit: int) -> str:
    rows = [
        "| network | unit "
        f"{unit}: range of the median | unit {unit}: range of the 15–85 spread | unit {unit}: final 15/50/85th | "
        "all units (mean): range of the median | all units (mean): range of the spread |",
        "|---|---|---|---|---|---|",
    ]
    for net, label in (("plain", "without BN"), ("bn", "with BN")):
        d = [s.drift[net] for s in summaries]
        final = " / ".join(
            f"{statistics.fmean(x['unit_final'][i] for x in d):+.2f}" for i in range(3)
        )
        rows.append(
            f"| {label} | {_fmt_short([x['unit_median_range'] for x in d])} | "
            f"{_fmt_short([x['unit_spread_range'] for x in d])} | {final} | "
            f"{_layer_cell(d, 'layer_median_range')} | {_layer_cell(d, 'layer_spread_range')} |"
        )
    return "\n".join(rows)


def _verdict_table(runs: list[Run], summaries: list[Summary]) -> str:
    finals = {net: [s.final[net] for s in summaries] for net in NETS}
    rows = ["| claim (paper, Sec. 4.1 / Figure 1) | measured | verdict |", "|---|---|---|"]
    rows += [f"| {c} | {m} | **{v}** |" for c, m, v in _verdicts(finals, summaries)]
    return "\n".join(rows)


def _sensitivity_text(run: Run) -> str:
    sens = run.sensitivity
    if not sens:
        return "(not measured: `population_batches.json` is missing)"
    m = sens["batch_size"]
    rows = [
        "| batches K (images) | test accuracy, 3 independent draws of the K batches |",
        "|---|---|",
    ]
    for k, accs in sens["accuracy"].items():
        rows.append(f"| {k} ({int(k) * m:,}) | " + ", ".join(f"{a:.4f}" for a in accs) + " |")
    return "\n".join(rows)


def _timing_text(summaries: list[Summary]) -> str:
    walls = ", ".join(f"{x.wall_s:.0f} s" for x in summaries)
    plain = ", ".join(f"{x.step_us['plain']:.0f}" for x in summaries)
    bn = ", ".join(f"{x.step_us['bn']:.0f}" for x in summaries)
    sessions = ", ".join(str(x.sessions) for x in summaries)
    return (
        f"Wall time per run of {summaries[0].steps:,} steps (training both networks and every "
        f"evaluation, summed over sessions; data loading and the report add a few seconds): "
        f"**{walls}**. One SGD step: {plain} µs without BN, {bn} µs with BN (our BatchNorm1d); "
        "`python benchmarks/bm_mnist_step.py` compares it with torch.nn.BatchNorm1d in one "
        "process. These are wall-clock times on whatever else the machine was running. "
        f"Sessions per run (1 = never interrupted): {sessions}."
    )


def _sensitivity_note(run: Run) -> str:
    if run.source == runfiles.METRICS:
        return ""
    return (
        "\n\n(This run's `metrics.jsonl` is not in its folder: these numbers are read from "
        "`metrics.csv`, which lacks the per-unit percentiles of the whole layer.)"
    )


def write_run_report(run: Run) -> Path:
    """``report.md`` and ``figure1.png/svg`` in the pair's folder."""
    run.path.mkdir(parents=True, exist_ok=True)
    plot_figure1(run)
    s = summarize(run)
    cfg = run.config
    env = run.env.get("sessions", [{}])[0]
    text = template("mnist_run.md").substitute(
        name=run.name,
        path=run.path,
        numbers=_numbers_table([s]),
        eval_every=cfg["eval_every"],
        paper=_paper_table([s]),
        verdicts=_verdict_table([run], [s]),
        drift=_drift_table([s], cfg["probe_unit"]) + _sensitivity_note(run),
        probe_examples=cfg["probe_examples"],
        santurkar=template("mnist_santurkar.md").template.strip(),
        final_population=f"{s.final['bn_population']:.4f}",
        final_ema=f"{s.final['bn_ema']:.4f}",
        bn_momentum=cfg["bn_momentum"],
        sensitivity=_sensitivity_text(run),
        settings=_settings_table(cfg),
        timing=_timing_text([s]),
        torch=run.versions.get("torch", "?"),
        batchnorm=run.versions.get("batchnorm", "?"),
        cpu=env.get("cpu", "?"),
        cores=env.get("cpu_count", "?"),
        threads=env.get("torch_threads", "?"),
        git=env.get("git_revision", "?"),
    )
    path = run.path / "report.md"
    write_text(path, text)
    return path


def write_sweep_report(folder: Path, runs: list[Run]) -> Path:
    """``report.md`` and ``sweep.png/svg`` in the study folder: every setting, mean and spread."""
    folder = Path(folder)
    groups = _groups(runs)
    main = _main_group(groups, runfiles.read_study(folder).get("main", {}))
    main_s = [summarize(r) for r in main]
    if len(runs) > 1:
        plot_sweep(runs, folder / "sweep")
    first = main[0]
    cfg = first.config
    rows = [
        "| setting | seeds | without BN | with BN (population) | with BN (EMA) | BN steps to 97% | steps to 97% without BN |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in groups.values():
        ss = [summarize(r) for r in group]
        gc = group[0].config
        rows.append(
            f"| {_group_label(gc)} | {', '.join(str(r.config['seed']) for r in group)} | "
            + " | ".join(_fmt_mean([s.final[n] for s in ss]) for n in NETS)
            + f" | {_fmt_steps([s.to_threshold['bn_population']['0.97'] for s in ss], gc['steps'])}"
            + f" | {_fmt_steps([s.to_threshold['plain']['0.97'] for s in ss], gc['steps'])} |"
        )
    runs_list = "\n".join(f"- [`{r.name}`]({r.path.relative_to(folder)}/report.md)" for r in runs)
    spread = (
        "with several seeds, numbers are mean ± standard deviation (min, max)."
        if len(main) > 1
        else "one seed: no spread."
    )
    text = template("mnist_study.md").substitute(
        folder=folder,
        setting=_group_label(cfg),
        seeds=len(main),
        spread=spread,
        seed=cfg["seed"],
        figure=f"{first.path.relative_to(folder)}/figure1.png",
        numbers=_numbers_table(main_s),
        paper=_paper_table(main_s),
        verdicts=_verdict_table(main, main_s),
        drift=_drift_table(main_s, cfg["probe_unit"]) + _sensitivity_note(first),
        santurkar=template("mnist_santurkar.md").template.strip(),
        every_setting="\n".join(rows),
        sweep_figure="![sweep](sweep.png)\n\n" if len(runs) > 1 else "",
        choices=template("mnist_choices.md").template.strip(),
        timing=_timing_text(main_s),
        runs=runs_list,
    )
    path = folder / "report.md"
    write_text(path, text)
    return path


def write_reports(folder: str | Path, runs: Sequence[runfiles.RunFiles] | None = None) -> Path:
    """Regenerate everything under ``folder`` (a study folder, or a run folder of either
    network); return the report of ``folder``."""
    folder = Path(folder)
    if (folder / runfiles.CONFIG).is_file() and runs is None:
        runs = runfiles.find_runs(folder)
    if (folder / runfiles.CONFIG).is_file() and len(runs or []) < 2:
        # one network's run: its twin is a sibling in the study folder
        pairs = [p for p in find_pairs(folder.parent) if folder in p.members]
    else:
        pairs = find_pairs(folder, runs)
    if not pairs:
        raise ReportError(
            f"{folder} holds no pair of MNIST runs (the network without BN and the one with it, "
            "same settings and seed), so there is no Figure 1 to draw; run `batchnorm reproduce "
            "mnist` with both networks (the default) into that folder"
        )
    for p in pairs:
        write_run_report(p)
    if (folder / runfiles.CONFIG).is_file():
        return pairs[0].path / "report.md"
    if "protocol" in runfiles.read_study(folder):  # the pre-registered study
        from .mnist_study import write_study_report

        return write_study_report(folder, runs or runfiles.find_runs(folder))
    return write_sweep_report(folder, pairs)
