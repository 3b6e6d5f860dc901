"""The ``batchnorm`` command line: thin wrappers that parse arguments and call the experiments."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .experiments import demo

    demo.run(demo.DemoConfig(steps=args.steps, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization (Ioffe & Szegedy, 2015): layers, kernels and the paper's experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small BN network on synthetic data (about a minute)")
    p.add_argument("--steps", type=int, default=400, help="SGD steps (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
