"""The ``batchnorm`` command line: parses, calls the experiments and the reports, prints.

The options of ``batchnorm reproduce <experiment>`` and ``batchnorm demo`` are generated from the
config dataclasses (:mod:`batchnorm.experiments.config`): each flag's type, default and help come
from its field, and a bad value gets the config's own check, printed under the flag's name. Bad
input is one line on stderr and exit code 2; a missing data set or a run that cannot go on, exit
code 1; Ctrl-C, 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from . import __version__

USAGE_ERROR, RUN_ERROR, INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


# -- options generated from a config ----------------------------------------------------------------


def _parser_of(kind: type, sweep: bool):
    """``argparse`` type: one value of ``kind``, or (``sweep``) a comma-separated list of them."""

    def one(text: str):
        text = text.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        try:
            return kind(text)
        except ValueError:
            name = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None

    if not sweep:
        return one

    def many(text: str):
        values = [one(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return many


def _add_config_options(parser: argparse.ArgumentParser, config: type, presets: dict) -> list:
    from .experiments.config import options

    opts = list(options(config))
    for opt in opts:
        extra = "".join(
            f"; --{name}: {_show(values[opt.path])}"
            for name, values in presets.items()
            if opt.path in values
        )
        plural = " (comma-separated: every combination runs)" if opt.sweep else ""
        metavar = {int: "N", float: "X"}.get(opt.type, "VALUE")
        if opt.choices:
            metavar = "{" + ",".join(map(str, opt.choices)) + "}"
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            type=_parser_of(opt.type, opt.sweep),
            choices=None if opt.sweep else opt.choices,
            metavar=f"{metavar},{metavar},..." if opt.sweep else metavar,
            help=f"{opt.help}{plural} (default {_show(opt.default)}{extra})",
        )
    return opts


def _show(value: object) -> str:
    if value is None:
        return "all"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flag(field: str, opts: list) -> str:
    """The flag a config field is set by (``seed`` -> ``--seeds``), else the field's name."""
    from .experiments.config import flag_name

    special = {
        "seed": "--seeds",
        "network": "--networks",
        "processes": "torchrun's --nproc-per-node",
    }
    if field in special:
        return special[field]
    names = {o.name.replace("_", "."): o.flag for o in opts} | {o.name: o.flag for o in opts}
    return names.get(field, names.get(field.replace(".", "_"), flag_name(field)))


def _config_error(exc, opts: list) -> UsageError:
    return UsageError(f"{_flag(exc.field, opts)} {exc.problem}")


# -- torchrun and data ----------------------------------------------------------------------------


@contextlib.contextmanager
def _processes() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` of this process; under ``torchrun`` (``WORLD_SIZE`` > 1) it joins
    the process group (gloo: the experiments train on the CPU) for the body, and leaves it after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def _load_data(name: str, args: argparse.Namespace, rank: int, world: int):
    """The data set, loaded (or downloaded) by rank 0 first, then by the other ranks from where
    rank 0 found it; every rank raises rank 0's error."""
    from . import data

    if world == 1:
        return data.load(name, args.data_dir, download=not args.no_download)
    import torch.distributed as dist

    box: list = [None, None]  # [folder, error message]
    failure = None
    if rank == 0:
        try:
            dataset = data.load(name, args.data_dir, download=not args.no_download)
            box = [str(dataset.source), None]
        except Exception as exc:  # a DataError, or anything else: the other ranks must not wait
            failure, box = exc, [None, str(exc)]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        raise data.DataError(f"rank 0 could not load {name}: {box[1]}")
    return dataset if rank == 0 else data.load(name, box[0], download=False)


def _check_out(out: Path) -> None:
    """``--out`` must be a folder this process can write (made if missing)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"--out {out} cannot be written ({exc.strerror or type(exc).__name__}); choose "
            "another --out"
        ) from None


def _build_kernels(say) -> bool:
    """Load the fused kernels, saying so first when that means compiling them."""
    from .functional import kernels

    if not kernels.needs_build():
        return kernels.load()
    say(
        f"building the fused CPU kernels once (about a minute); cached in {kernels.build_dir()}",
        flush=True,
    )
    start = time.perf_counter()
    ok = kernels.load()
    if ok:
        say(f"kernels built in {time.perf_counter() - start:.0f} s", flush=True)
    else:
        say(f"kernels not built; the portable path is used ({kernels.status()})", flush=True)
    return ok


def _quiet(*args: object, **kwargs: object) -> None:
    """``print`` on ranks other than 0: they say nothing."""


def _err(*args: object, **kwargs: object) -> None:
    print(*args, file=sys.stderr, **kwargs)


# -- commands ----------------------------------------------------------------------------------


def _reproduce(args: argparse.Namespace) -> int:
    from .experiments.runs import RunError

    with _processes() as (rank, world):
        say = print if rank == 0 else _quiet
        prog = f"batchnorm reproduce {args.experiment}"
        try:
            return _reproduce_ranks(args, rank, world, say)
        except UsageError as exc:
            (_err if rank == 0 else _quiet)(f"{prog}: {exc}")
            return USAGE_ERROR
        except RunError:  # another rank's failure, which that rank reports
            return RUN_ERROR


# Options that choose the runs: any of them means "just these runs", not the pre-registered study.
_KEEP_STUDY = ("threads", "dataset")


def _adhoc(args: argparse.Namespace) -> bool:
    """Whether the command names its own runs (``--networks``, ``--seeds``, or any setting but
    ``--threads``/``--dataset``) instead of asking for the experiment's pre-registered study."""
    chosen = [o.name for o in args.opts if getattr(args, o.name) is not None]
    return bool(args.networks or args.seeds or [n for n in chosen if n not in _KEEP_STUDY])


def _base(experiment, args: argparse.Namespace, world: int, start):
    """``start`` with the data-parallel settings, the preset and every scalar option applied,
    and the lists the options sweep."""
    from .experiments.config import with_values

    base = with_values(start, {("processes",): world, ("bn_sync",): args.bn == "sync"})
    base = experiment.preset(base, "quick" if args.quick else None)
    scalars, lists = {}, {}
    for opt in args.opts:
        value = getattr(args, opt.name)
        if value is not None:
            (lists if opt.sweep else scalars)[opt.path] = value
    return with_values(base, scalars), lists


def _configs(experiment, args: argparse.Namespace, world: int, opts: list) -> list:
    """The runs the command names: every combination of its lists, networks and seeds."""
    from .experiments.config import ConfigError, grid, with_values

    try:
        base, lists = _base(experiment, args, world, experiment.config())
        networks = _networks(experiment, args.networks)
        return [
            with_values(cfg, {("network",): net, ("seed",): seed})
            for cfg in grid(base, lists)
            for net in networks
            for seed in args.seeds or [base.seed]
        ]
    except ConfigError as exc:
        raise _config_error(exc, opts) from None


def _protocol(experiment, args: argparse.Namespace, world: int):
    """The experiment's pre-registered study on the command line's --threads/--dataset."""
    from .experiments.config import ConfigError

    try:
        base, _ = _base(experiment, args, world, experiment.study_base)
    except ConfigError as exc:
        raise _config_error(exc, args.opts) from None
    return experiment.protocol(base, args.quick)


def _networks(experiment, text: str | None) -> list[str]:
    if text is None:
        return list(experiment.network_groups.get("all", experiment.networks))
    if text in experiment.network_groups:
        return list(experiment.network_groups[text])
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in experiment.networks]
    if unknown or not names:
        groups = ", ".join(f"'{g}'" for g in experiment.network_groups)
        raise UsageError(
            f"--networks: unknown network(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(experiment.networks)}" + (f", or {groups}" if groups else "")
        )
    return names


def _default_out(experiment: str, quick: bool, world: int, bn: str) -> str:
    """runs/<experiment>[-quick][-<N>proc-<bn>]: a data-parallel run gets its own folder."""
    suffix = "-quick" if quick else ""
    if world > 1:
        suffix += f"-{world}proc-{bn}"
    return f"runs/{experiment}{suffix}"


def _reproduce_ranks(args: argparse.Namespace, rank: int, world: int, say) -> int:
    from . import data, runfiles
    from ._atomic import write_text
    from .experiments import study
    from .experiments.config import ConfigError
    from .experiments.protocol import run_protocol
    from .experiments.runs import Ranks, RunError, tensorboard_available
    from .reporting import ReportError, write_report

    experiment = study.get(args.experiment)
    prog = f"batchnorm reproduce {args.experiment}"
    plan = None
    if _adhoc(args) or experiment.protocol is None:
        configs = _configs(experiment, args, world, args.opts)
    else:
        plan = _protocol(experiment, args, world)
        configs = [cfg for _, cfg in plan.grid]
    if args.jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {args.jobs}")
    if world > 1 and args.jobs > 1:
        raise UsageError("--jobs must be 1 under torchrun (the processes share each run)")
    out = Path(args.out or _default_out(args.experiment, args.quick, world, args.bn))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        dataset = _load_data(configs[0].dataset, args, rank, world)
    except data.DataError as exc:
        say(f"{prog}: {exc}", file=sys.stderr)
        return RUN_ERROR
    try:
        for cfg in configs:
            experiment.check_fits(cfg, len(dataset.train.labels), len(dataset.test.labels))
    except ConfigError as exc:
        raise _config_error(exc, args.opts) from None
    failure = None
    if rank == 0:
        try:
            _check_out(out)
        except UsageError as exc:
            failure = exc
    Ranks().agree(failure)  # under torchrun the other ranks stop with rank 0
    jobs = min(args.jobs, len(configs))
    what = f"the pre-registered study {plan.name}" if plan else f"{len(configs)} run(s)"
    say(f"data: {dataset.name} from {dataset.source}; {what} into {out}, {jobs} at a time")
    if world > 1:
        say(f"{world} processes, BN statistics {args.bn}; rank 0 writes")
    if rank == 0:
        if not tensorboard_available():
            say("TensorBoard events off (pip install 'batchnorm[tensorboard]' to write them)")
        _build_kernels(say)  # before the workers start, which would each wait for the build
    if rank == 0 and plan is None:
        main = experiment.preset(experiment.config(), "quick" if args.quick else None)
        study_doc = {"experiment": experiment.name, "schema": runfiles.SCHEMA}
        study_doc["main"] = {
            k: v for k, v in main.to_dict().items() if k not in ("network", "seed")
        }
        if not (out / runfiles.STUDY).exists():
            import json

            write_text(out / runfiles.STUDY, json.dumps(study_doc, indent=2) + "\n")
    options = dict(
        preset="quick" if args.quick else None,
        jobs=jobs,
        progress=not args.no_progress and rank == 0,
        echo=say,
    )
    try:
        if plan is None:
            study.run_study(experiment, configs, out, dataset, **options)
        else:
            run_protocol(experiment, plan, out, dataset, **options)
    except RunError as exc:
        say(f"{prog}: {exc}", file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        say(
            f"\ninterrupted; every run in {out} keeps its last checkpoint. Run the same command "
            "to resume.",
            file=sys.stderr,
        )
        return INTERRUPTED
    if rank == 0:
        try:
            print(f"report: {write_report(out)}")
        except ReportError as exc:  # e.g. one network of a pair: the runs are fine, no figure
            print(f"no report: {exc}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .reporting import ReportError, write_report

    try:
        path = write_report(args.folder)
    except (FileNotFoundError, ReportError) as exc:
        _err(f"batchnorm report: {exc}")
        return USAGE_ERROR
    print(f"report: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .experiments import demo
    from .experiments.config import ConfigError

    try:
        cfg = demo.DemoConfig(
            **{
                o.name: getattr(args, o.name)
                for o in args.opts
                if getattr(args, o.name) is not None
            }
        )
    except ConfigError as exc:
        _err(f"batchnorm demo: {_config_error(exc, args.opts)}")
        return USAGE_ERROR
    _build_kernels(print)
    demo.run(cfg)
    return 0


def _build_kernels_command(args: argparse.Namespace) -> int:
    from .functional import kernels

    if _build_kernels(print):
        print(kernels.status())
        return 0
    _err(f"batchnorm build-kernels: {kernels.status()}")
    return RUN_ERROR


# -- the parser ------------------------------------------------------------------------------------


def _bn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bn",
        choices=["sync", "per-rank"],
        default="sync",
        help="under torchrun --nproc-per-node N: BN statistics over the whole global batch "
        "(sync, the default: the same normalization as one process) or over each process's "
        "slice of it (per-rank). The global batch and data order are those of a single-process "
        "run either way.",
    )


def _seeds(text: str) -> list[int]:
    values = _parser_of(int, True)(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be integers >= 0, got {text!r}")
    return values


def _add_reproduce(sub, name: str) -> None:
    from .experiments import study
    from .experiments.config import flag_name

    experiment = study.get(name)
    p = sub.add_parser(name, help=experiment.summary, description=experiment.description)
    groups = "".join(f", '{g}'" for g in experiment.network_groups)
    p.add_argument(
        "--networks",
        help=f"comma-separated, from {', '.join(experiment.networks)}{groups} (default: all)",
    )
    p.add_argument(
        "--seeds", type=_seeds, metavar="A,B,...", help="seed(s), e.g. 0,1,2 (default 0)"
    )
    opts = _add_config_options(p, experiment.config, dict(experiment.presets))
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at the same time, each in its own process (default 1; use the number "
        "of cores, with --threads 1)",
    )
    p.add_argument(
        "--out", help=f"output folder (default runs/{name}, or runs/{name}-quick with --quick)"
    )
    p.add_argument(
        "--data-dir",
        help="folder with the data set's files (else $BATCHNORM_DATA, the cache, or a download)",
    )
    p.add_argument("--no-download", action="store_true", help="never download the data set")
    quick = experiment.presets.get("quick", {})
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run for a first look and CI: "
        + ", ".join(f"{flag_name('_'.join(k))} {_show(v)}" for k, v in quick.items()),
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one line per evaluation instead",
    )
    _bn_argument(p)
    p.set_defaults(func=_reproduce, opts=opts, experiment=name)


def build_parser() -> argparse.ArgumentParser:
    from .experiments import demo, study

    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization (Ioffe & Szegedy, 2015): layers, kernels and the paper's experiments.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small BN network on synthetic data (about 10 seconds)")
    p.set_defaults(func=_demo, opts=_add_config_options(p, demo.DemoConfig, {}))

    rep = sub.add_parser("reproduce", help="reproduce one of the paper's experiments")
    rsub = rep.add_subparsers(dest="experiment", required=True)
    for name in study.EXPERIMENTS:
        _add_reproduce(rsub, name)

    r = sub.add_parser(
        "report",
        help="regenerate the plots and report.md of a run or study folder from its files",
    )
    r.add_argument("folder", help="a run folder, or the --out folder of `batchnorm reproduce`")
    r.set_defaults(func=_report)

    b = sub.add_parser(
        "build-kernels",
        help="compile the fused CPU kernels now (about a minute, once; later runs start at once)",
    )
    b.set_defaults(func=_build_kernels_command)
    return parser


def _version() -> str:
    import torch

    return f"batchnorm {__version__} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
