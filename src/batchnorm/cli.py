"""The ``batchnorm`` command line: thin wrappers that parse arguments and call the experiments."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

# What --quick changes: a short run for CI and a first look (about half a minute).
QUICK = {"steps": 2000, "eval_every": 100}


def _demo(args: argparse.Namespace) -> int:
    from .experiments import demo

    demo.run(demo.DemoConfig(steps=args.steps, seed=args.seed))
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


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


def _misfit(check_fits, configs, dataset) -> str | None:
    """Why the first config whose sizes exceed the data set's cannot run, checked for every run
    before the first one starts; None if all fit."""
    from .experiments.runs import ConfigError

    try:
        for cfg in configs:
            check_fits(cfg, len(dataset.train.labels), len(dataset.test.labels))
    except ConfigError as exc:
        return str(exc)
    return None


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


def _reproduce_mnist(args: argparse.Namespace) -> int:
    with _processes() as (rank, world):
        return _reproduce_mnist_ranks(args, rank, world)


def _reproduce_mnist_ranks(args: argparse.Namespace, rank: int, world: int) -> int:
    from . import data
    from .experiments import mnist
    from .reporting import mnist as report

    say = print if rank == 0 else _quiet
    base = mnist.MnistConfig(processes=world, bn_sync=args.bn == "sync")
    overrides = dict(QUICK) if args.quick else {}
    for name in (
        "steps",
        "batch_size",
        "eval_every",
        "population_batches",
        "momentum",
        "dataset",
        "threads",
    ):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    try:
        base = replace(base, **overrides)
        configs = mnist.sweep(
            base,
            lrs=args.lr or (),
            init_stds=args.init_std or (),
            epss=args.eps or (),
            seeds=args.seeds or (),
        )
    except ValueError as exc:
        say(f"batchnorm reproduce mnist: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or _default_out("mnist", args.quick, world, args.bn))
    try:
        dataset = _load_data(base.dataset, args, rank, world)
    except data.DataError as exc:
        say(f"batchnorm reproduce mnist: {exc}", file=sys.stderr)
        return 1
    if misfit := _misfit(mnist.check_fits, configs, dataset):
        say(f"batchnorm reproduce mnist: {misfit}", file=sys.stderr)
        return 2
    prepared = mnist.prepare_data(dataset, base.binarize_threshold)
    say(f"data: {dataset.name} from {dataset.source}; {len(configs)} run(s) into {out}")
    if world > 1:
        say(f"{world} processes, BN statistics {args.bn}; rank 0 writes")
    current = None
    try:
        for cfg in configs:
            current = out / mnist.run_name(cfg)
            mnist.run(cfg, current, prepared, progress=not args.no_progress and rank == 0)
            if rank == 0:
                report.write_run_report(report.load_run(current))
    except mnist.RunError as exc:
        say(f"batchnorm reproduce mnist: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say(
            f"\ninterrupted; {current} keeps its last checkpoint. Run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    if rank == 0:
        path = report.write_sweep_report(out, report.find_runs(out))
        print(f"report: {path}")
    return 0


def _quiet(*args: object, **kwargs: object) -> None:
    """``print`` on ranks other than 0: they say nothing."""


def _default_out(experiment: str, quick: bool, world: int, bn: str) -> str:
    """runs/<experiment>[-quick][-<N>proc-<bn>]: a data-parallel run gets its own folder."""
    suffix = "-quick" if quick else ""
    if world > 1:
        suffix += f"-{world}proc-{bn}"
    return f"runs/{experiment}{suffix}"


def _networks(text: str) -> list[str]:
    from .experiments.convnet import MAIN, NETWORKS, STUDY

    if text == "all":
        return list(STUDY)
    if text == "main":
        return list(MAIN)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown network(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(NETWORKS)}, or 'all' (the paper's seven) or 'main' ({','.join(MAIN)})"
        )
    return names


def _reproduce_convnet(args: argparse.Namespace) -> int:
    with _processes() as (rank, world):
        return _reproduce_convnet_ranks(args, rank, world)


def _reproduce_convnet_ranks(args: argparse.Namespace, rank: int, world: int) -> int:
    from . import data
    from .experiments import convnet
    from .reporting import convnet as report

    say = print if rank == 0 else _quiet
    try:
        base = convnet.ConvnetConfig(processes=world, bn_sync=args.bn == "sync")
        if args.quick:
            base = convnet.quick(base)
        overrides = {
            name: getattr(args, name)
            for name in ("steps", "eval_every", "dataset", "threads", "width", "test_examples")
            if getattr(args, name) is not None
        }
        base = replace(base, **overrides)
        configs = [
            replace(base, network=net, seed=seed, base=replace(base.base, lr=lr))
            for lr in args.base_lr or [base.base.lr]
            for net in args.networks
            for seed in args.seeds or [base.seed]
        ]
    except ValueError as exc:
        say(f"batchnorm reproduce convnet: {exc}", file=sys.stderr)
        return 2
    if args.jobs < 1 or (world > 1 and args.jobs > 1):
        say(
            "batchnorm reproduce convnet: --jobs must be at least 1, and 1 under torchrun (the "
            "processes share each run)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or _default_out("convnet", args.quick, world, args.bn))
    try:
        dataset = _load_data(base.dataset, args, rank, world)
    except data.DataError as exc:
        say(f"batchnorm reproduce convnet: {exc}", file=sys.stderr)
        return 1
    if misfit := _misfit(convnet.check_fits, configs, dataset):
        say(f"batchnorm reproduce convnet: {misfit}", file=sys.stderr)
        return 2
    say(
        f"data: {dataset.name} from {dataset.source}; {len(configs)} run(s) into {out}, "
        f"{min(args.jobs, len(configs))} at a time"
    )
    if world > 1:
        say(f"{world} processes, BN statistics {args.bn}; rank 0 writes")
    try:
        convnet.run_study(
            configs,
            out,
            dataset,
            jobs=args.jobs,
            progress=not args.no_progress and rank == 0,
            echo=say,
        )
    except convnet.RunError as exc:
        say(f"batchnorm reproduce convnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say(
            f"\ninterrupted; every run in {out} keeps its last checkpoint. Run the same command "
            "to resume.",
            file=sys.stderr,
        )
        return 130
    if rank == 0:
        path = report.write_report(out)
        print(f"report: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .reporting import convnet, mnist

    folder = Path(args.folder)
    configs = [folder / "config.json", *folder.glob("*/config.json")] if folder.is_dir() else []
    is_convnet = any(p.is_file() and '"network"' in p.read_text() for p in configs)
    try:
        path = convnet.write_report(folder) if is_convnet else mnist.write_reports(folder)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"batchnorm report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization (Ioffe & Szegedy, 2015): layers, kernels and the paper's experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small BN network on synthetic data (a few seconds)")
    p.add_argument("--steps", type=int, default=400, help="SGD steps (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_demo)

    rep = sub.add_parser("reproduce", help="reproduce one of the paper's experiments")
    rsub = rep.add_subparsers(dest="experiment", required=True)
    from .experiments.mnist import MnistConfig

    d = MnistConfig()
    m = rsub.add_parser(
        "mnist",
        help="Figure 1: MNIST MLP with and without BN (about 3 minutes per seed on 2 cores)",
        description=(
            "Reproduce Figure 1 of the paper (Sec. 4.1): a 784-100-100-100-10 sigmoid MLP on "
            "binarized MNIST, trained with plain SGD with and without BN (our BatchNorm1d before "
            "every hidden sigmoid, hidden biases dropped), same seed and data order. Writes one "
            "folder per setting (config.json, env.json, metrics.jsonl/.csv, checkpoint, TensorBoard "
            "events, figure1.png/.svg, report.md) and a summary report.md in --out. Interrupted "
            "runs resume from their last checkpoint when the same command is run again. "
            "Lists (--lr 0.1,0.5) run every combination."
        ),
    )
    m.add_argument(
        "--steps",
        type=int,
        help=f"SGD steps per network (default {d.steps}; --quick: {QUICK['steps']})",
    )
    m.add_argument(
        "--batch-size", type=int, help=f"examples per mini-batch (default {d.batch_size})"
    )
    m.add_argument("--lr", type=_floats, help=f"learning rate(s), comma-separated (default {d.lr})")
    m.add_argument(
        "--init-std",
        type=_floats,
        help=f"std(s) of the Gaussian initial weights (default {d.init_std})",
    )
    m.add_argument("--eps", type=_floats, help=f"BN epsilon(s) (default {d.eps})")
    m.add_argument(
        "--seeds",
        type=_ints,
        help=f"seed(s), e.g. 0,1,2; with 3 or more the report shows mean and spread (default {d.seed})",
    )
    m.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between test evaluations and checkpoints (default {d.eval_every}; --quick: {QUICK['eval_every']})",
    )
    m.add_argument(
        "--population-batches",
        type=int,
        help=f"training batches of the Alg. 2 population pass at each evaluation (default {d.population_batches})",
    )
    m.add_argument(
        "--momentum",
        type=float,
        help=f"momentum of BN's moving-average statistics (default {d.momentum})",
    )
    m.add_argument(
        "--threads",
        type=int,
        help=f"intra-op threads while training (default {d.threads}: predictable on a shared machine)",
    )
    m.add_argument(
        "--dataset", choices=["mnist", "fashion-mnist"], help=f"data set (default {d.dataset})"
    )
    m.add_argument(
        "--out", help="output folder (default runs/mnist, or runs/mnist-quick with --quick)"
    )
    m.add_argument(
        "--data-dir",
        help="folder with the four IDX files (else $BATCHNORM_DATA, the cache, or a download)",
    )
    m.add_argument("--no-download", action="store_true", help="never download the data set")
    m.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: {QUICK['steps']} steps, evaluated every {QUICK['eval_every']}",
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    _bn_argument(m)
    m.set_defaults(func=_reproduce_mnist)

    from .experiments.convnet import MAIN, NETWORKS, STUDY, ConvnetConfig
    from .experiments.convnet import QUICK as CQ

    c = ConvnetConfig()
    cv = rsub.add_parser(
        "convnet",
        help="Figures 2-3: accelerating BN networks, a small Inception on Fashion-MNIST (51 "
        "minutes for all 7 networks with --jobs 2 on 2 cores)",
        description=(
            "Reproduce Sec. 4.2 of the paper (Figures 2 and 3) at CPU scale: a small Inception "
            "network on Fashion-MNIST trained as Baseline, BN-Baseline, BN-x5, BN-x30, "
            "BN-x5-Sigmoid, and the controls Baseline-x5 and Baseline-Sigmoid; each network's "
            "steps to reach the Baseline's best test accuracy (and, when named, our ablation "
            "bn-x5-slow-decay: BN-x5 with the Baseline's learning-rate decay). One folder per network and seed "
            "(config.json, env.json, metrics.jsonl/.csv, checkpoint, TensorBoard events) and "
            "report.md with figure2.png/.svg in --out. Interrupted runs resume from their last "
            "checkpoint when the same command is run again. Lists (--seeds 0,1,2, --base-lr "
            "0.01,0.02) run every combination."
        ),
    )
    cv.add_argument(
        "--networks",
        type=_networks,
        default=list(STUDY),
        help=f"comma-separated, from {', '.join(NETWORKS)}; 'all' (default: the paper's "
        f"seven) or 'main' ({','.join(MAIN)})",
    )
    cv.add_argument("--seeds", type=_ints, help=f"seed(s), e.g. 0,1,2 (default {c.seed})")
    cv.add_argument(
        "--base-lr",
        type=_floats,
        help=f"the Baseline's learning rate(s); every network's is a multiple of it (default "
        f"{c.base.lr:g}; a list sweeps)",
    )
    cv.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at the same time, each in its own process (default 1; use the number "
        "of cores, with --threads 1)",
    )
    cv.add_argument(
        "--steps",
        type=int,
        help=f"SGD steps per network (default {c.steps:,}; --quick: {CQ['steps']})",
    )
    cv.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between evaluations after the first {4 * c.eval_every:,} (default "
        f"{c.eval_every}; a quarter of it before; --quick: {CQ['eval_every']})",
    )
    cv.add_argument(
        "--test-examples",
        type=int,
        help=f"evaluate on the first N test images (default: all; --quick: {CQ['test_examples']})",
    )
    cv.add_argument(
        "--width", type=float, help=f"channel multiplier of the network (default {c.width:g})"
    )
    cv.add_argument(
        "--threads",
        type=int,
        help=f"intra-op threads per run (default {c.threads}: predictable on a shared machine)",
    )
    cv.add_argument(
        "--dataset",
        choices=["fashion-mnist", "mnist", "cifar10"],
        help=f"data set (default {c.dataset})",
    )
    cv.add_argument(
        "--out", help="output folder (default runs/convnet, or runs/convnet-quick with --quick)"
    )
    cv.add_argument(
        "--data-dir",
        help="folder with the data set's files (else $BATCHNORM_DATA, the cache, or a download)",
    )
    cv.add_argument("--no-download", action="store_true", help="never download the data set")
    cv.add_argument(
        "--quick",
        action="store_true",
        help=f"a short study for CI and a first look: {CQ['steps']} steps per network, "
        f"evaluated on {CQ['test_examples']} test images",
    )
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    _bn_argument(cv)
    cv.set_defaults(func=_reproduce_convnet)

    r = sub.add_parser(
        "report",
        help="regenerate plots and report.md of a run, sweep or study folder from its files",
    )
    r.add_argument("folder", help="a run folder, or the --out folder of `batchnorm reproduce`")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
